"""Grouping a whole checkpoint: each stored tensor to exactly one codec; the README snippet runs."""

from __future__ import annotations

import re
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fmtconv.errors import FmtconvError
from fmtconv.formats import codec_names, registry, find_groups, get_codec, register_codec
from fmtconv.formats.dense import DenseCodec
from fmtconv.formats.safetensors_io import Checkpoint, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
ROOT = Path(__file__).resolve().parents[1]


def deepseek_v4_tensors(rng):
    """A DeepSeek-V4-style layer in the published naming: MXFP4 experts, ue8m0 FP8 attention, dense rest."""
    t = {"embed.weight": rng.standard_normal((32, 128)).astype(BF16), "layers.0.attn_norm.weight": np.ones(128, BF16)}
    t["layers.0.attn.wq_b.weight"] = rng.integers(0, 0x70, (256, 128), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    t["layers.0.attn.wq_b.scale"] = np.full((2, 1), 120, np.uint8).view(ml_dtypes.float8_e8m0fnu)
    for e in range(2):
        for w, shape in (("w1", (64, 128)), ("w2", (128, 64)), ("w3", (64, 128))):
            p = f"layers.0.ffn.experts.{e}.{w}"
            t[f"{p}.weight"] = rng.integers(0, 256, (shape[0], shape[1] // 2), dtype=np.uint8).view(np.int8)
            t[f"{p}.scale"] = rng.integers(115, 125, (shape[0], shape[1] // 32), dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    t["layers.0.ffn.gate.tid2eid"] = np.arange(8, dtype=np.int32).reshape(4, 2)
    return t


def test_deepseek_v4_checkpoint_groups(tmp_path):
    tensors = deepseek_v4_tensors(np.random.default_rng(0))
    ckpt = Checkpoint(write_safetensors(tmp_path / "model.safetensors", tensors))
    cfg = {"expert_dtype": "fp4", "quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}}
    groups = find_groups(ckpt.tensors, cfg)
    by = {g.name: g for g in groups}
    assert sum(len(g.parts) for g in groups) == len(tensors)
    assert by["layers.0.ffn.experts.1.w2.weight"].codec == "mxfp4" and by["layers.0.ffn.experts.1.w2.weight"].shape == (128, 64)
    assert by["layers.0.attn.wq_b.weight"].codec == "fp8_block" and by["layers.0.attn.wq_b.weight"].params["scale_kind"] == "e8m0"
    assert by["layers.0.ffn.gate.tid2eid"].codec == "dense" and by["embed.weight"].codec == "dense"
    for g in groups:  # every group decodes (integer passthrough aside)
        if g.params.get("dtype") == "I32":
            continue
        parts = {r: ckpt.array(n) for r, n in g.parts.items()}
        exact = get_codec(g.codec).decode(parts, g, compute_dtype=BF16)
        assert exact.values.shape == (g.rows, g.shape[-1])


def test_orphans_are_refused_by_name(tmp_path):
    tensors = deepseek_v4_tensors(np.random.default_rng(1))
    del tensors["layers.0.ffn.experts.0.w1.weight"]
    ckpt = Checkpoint(write_safetensors(tmp_path / "model.safetensors", tensors))
    with pytest.raises(FmtconvError, match=re.escape("'layers.0.ffn.experts.0.w1.scale'")):
        find_groups(ckpt.tensors, {"expert_dtype": "fp4"})


def test_registry_accepts_new_codecs():
    assert {"mxfp4", "fp8_block", "nvfp4", "mlx_affine", "mlx_mxfp4", "mlx_mxfp8", "mlx_nvfp4", "dense"} <= set(codec_names())

    @register_codec
    class MyDense(DenseCodec):
        name = "my_dense_for_test"
        priority = 99

    try:
        assert isinstance(get_codec("my_dense_for_test"), MyDense)
    finally:
        registry._CODECS.pop("my_dense_for_test", None)
    with pytest.raises(FmtconvError, match="no codec named"):
        get_codec("nope")


def test_readme_snippet_runs():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Using the codecs from another converter"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["mlx"]["weight"].dtype == np.uint32 and ns["mlx"]["scales"].dtype == BF16
    assert ns["exact"].values.shape == (64, 128)
