"""The pipeline on a dense bf16 checkpoint (generic layout): bytes equal mx.quantize, block size and
worker count never change the bytes, and mlx_lm loads the bundle and runs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from fmtconv.convert import convert, plan
from fmtconv.convert import encode as encode_mod
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import Checkpoint, save_sharded

CONFIG = {
    "model_type": "llama",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 96,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "max_position_embeddings": 256,
    "rope_theta": 10000.0,
}


@pytest.fixture(scope="module")
def dense_src(tmp_path_factory) -> Path:
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(3)
    model = llama.Model(llama.ModelArgs.from_dict(CONFIG))
    weights = {k: np.array(v.astype(mx.float32)).astype(ml_dtypes.bfloat16) for k, v in tree_flatten(model.parameters())}
    src = tmp_path_factory.mktemp("dense") / "src"
    save_sharded(src, weights, max_shard_bytes=200_000, metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(CONFIG))
    (src / "tokenizer_config.json").write_text("{}")
    (src / "LICENSE").write_text("test licence\n")
    return src


def _tensors(out: Path) -> dict[str, bytes]:
    with Checkpoint(out) as ck:
        return {n: ck.raw(n).tobytes() for n in ck.tensors}


def test_affine_bytes_equal_mx_quantize(dense_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = convert(dense_src, out, recipe="q4q8", kernel_backend="cpu", workers=2)
    assert result["tensors"] > 0 and out.is_dir() and not (tmp_path / "out.partial").exists()
    with Checkpoint(dense_src) as src, Checkpoint(out) as dst:
        for name in src.tensors:
            w = np.asarray(src.array(name))
            if name.endswith(".weight") and w.ndim == 2:
                module = name[: -len(".weight")]
                q, s, b = mx.quantize(mx.array(w.astype(np.float32)).astype(mx.bfloat16), group_size=64, bits=8)
                assert dst.raw(f"{module}.weight").tobytes() == np.array(q).tobytes(), name
                assert dst.raw(f"{module}.scales").tobytes() == np.array(s.astype(mx.float32)).astype(ml_dtypes.bfloat16).tobytes()
                assert dst.raw(f"{module}.biases").tobytes() == np.array(b.astype(mx.float32)).astype(ml_dtypes.bfloat16).tobytes()
            else:
                assert dst.raw(name).tobytes() == src.raw(name).tobytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    assert config["quantization_config"] == config["quantization"]
    assert config["fmtconv"]["recipe"] == "q4q8"
    assert (out / "LICENSE").read_text() == "test licence\n"
    assert (out / "tokenizer_config.json").exists()


def test_block_size_and_workers_do_not_change_bytes(dense_src: Path, tmp_path: Path, monkeypatch) -> None:
    convert(dense_src, tmp_path / "a", recipe="mixed_3_6", kernel_backend="metal", workers=1)
    monkeypatch.setattr(encode_mod, "BLOCK_ELEMENTS", 1000)  # many small row blocks, out of order on 2 threads
    convert(dense_src, tmp_path / "b", recipe="mixed_3_6", kernel_backend="metal", workers=2)
    assert _tensors(tmp_path / "a") == _tensors(tmp_path / "b")


def test_mlx_lm_loads_and_runs_the_bundle(dense_src: Path, tmp_path: Path) -> None:
    from mlx_lm.utils import load_model

    out = tmp_path / "out"
    convert(dense_src, out, recipe="mixed_3_6", kernel_backend="cpu")
    model, _ = load_model(out)
    p = plan(dense_src, "mixed_3_6")
    expected = {t.target.module: (t.bits, t.group_size) for t in p.tensors if t.quantized}
    seen = {}
    for path, m in model.named_modules():
        if hasattr(m, "bits"):
            seen[path] = (m.bits, m.group_size)
    assert seen == expected
    assert {b for b, _ in seen.values()} == {3, 6}
    ref, _ = load_model(dense_src)
    tokens = mx.array([[1, 5, 9, 13, 2, 7]])
    a = np.array(ref(tokens).astype(mx.float32))
    b = np.array(model(tokens).astype(mx.float32))
    assert np.isfinite(b).all()
    assert np.abs(a - b).max() < 0.5 * np.abs(a).max()


def test_refusals(dense_src: Path, tmp_path: Path) -> None:
    with pytest.raises(FmtconvError, match="inside it"):
        convert(dense_src, dense_src / "out")
    with pytest.raises(FmtconvError, match="must not be the source"):
        convert(dense_src, dense_src)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FmtconvError, match="--overwrite"):
        convert(dense_src, tmp_path / "exists")
    bad = tmp_path / "noconfig"
    shutil.copytree(dense_src, bad)
    (bad / "config.json").unlink()
    with pytest.raises(FmtconvError, match="config.json is missing"):
        convert(bad, tmp_path / "o")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
