"""The lossless routes end to end: MXFP4 -> affine 5-bit group 32 (exact) and MXFP4 -> MLX mxfp4 (repack),
checked against the fixtures' independent decoder (fixtures/fixture_lib.py, ml_dtypes only)."""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from fmtconv.convert import convert
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import Checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))
import fixture_lib as fl  # noqa: E402

V4 = ROOT / "fixtures" / "deepseek-v4-tiny"
GPT_OSS = ROOT / "fixtures" / "gpt-oss-tiny"
V4_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}


def _mx(a: np.ndarray) -> mx.array:
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
        return mx.array(a.view(np.uint16)).view(mx.bfloat16)
    return mx.array(a)


def _v4_experts(layer: int, proj: str) -> np.ndarray:
    dense = fl.decode_fixture_dense(V4)
    n = sum(1 for k in dense if k.startswith(f"layers.{layer}.ffn.experts.") and k.endswith(f".{V4_PROJ[proj]}.weight"))
    return np.stack([dense[f"layers.{layer}.ffn.experts.{e}.{V4_PROJ[proj]}.weight"] for e in range(n)])


def test_lossless_affine_dequantizes_to_the_source_exactly(tmp_path: Path) -> None:
    convert(V4, tmp_path / "out", recipe="lossless-affine", kernel_backend="cpu")
    with Checkpoint(tmp_path / "out") as ck:
        modules = sorted({n.rsplit(".", 1)[0] for n in ck.tensors if ".switch_mlp." in n and n.endswith(".scales")})
        assert modules
        for m in modules:
            layer, proj = int(m.split(".")[2]), m.rsplit(".", 1)[1]
            w, s, b = (_mx(np.asarray(ck.array(f"{m}.{p}"))) for p in ("weight", "scales", "biases"))
            got = np.array(mx.dequantize(w, s, b, group_size=32, bits=5, stream=mx.cpu).astype(mx.float32))
            want = _v4_experts(layer, proj).astype(ml_dtypes.bfloat16).astype(np.float32)
            assert np.array_equal(got, want), m  # == treats -0.0 and +0.0 alike, as the route documents


def test_mxfp4_repack_keeps_the_source_bytes(tmp_path: Path) -> None:
    convert(V4, tmp_path / "out", recipe="mxfp4-experts")
    src, _ = fl.read_checkpoint(V4)
    with Checkpoint(tmp_path / "out") as ck:
        for layer in (0, 1):
            for proj, w in V4_PROJ.items():
                m = f"model.layers.{layer}.mlp.experts.switch_mlp.{proj}"
                n = ck.tensors[f"{m}.weight"].shape[0]
                packed = np.stack([src[f"layers.{layer}.ffn.experts.{e}.{w}.weight"] for e in range(n)])
                scales = np.stack([src[f"layers.{layer}.ffn.experts.{e}.{w}.scale"] for e in range(n)])
                assert ck.raw(f"{m}.weight").tobytes() == packed.tobytes()
                assert ck.raw(f"{m}.scales").tobytes() == scales.tobytes()


def test_gpt_oss_gate_up_is_deinterleaved_on_packed_rows(tmp_path: Path) -> None:
    convert(GPT_OSS, tmp_path / "out", recipe="mxfp4-experts")
    dense = fl.decode_fixture_dense(GPT_OSS)
    key = next(k for k in dense if k.endswith("mlp.experts.gate_up_proj"))
    gate_up = dense[key]
    prefix = key[: -len("experts.gate_up_proj")]
    with Checkpoint(tmp_path / "out") as ck:
        for proj, rows in (("gate_proj", slice(0, None, 2)), ("up_proj", slice(1, None, 2))):
            m = f"{prefix}experts.{proj}"
            w, s = _mx(np.asarray(ck.array(f"{m}.weight"))), _mx(np.asarray(ck.array(f"{m}.scales")))
            got = np.array(mx.dequantize(w, s, mode="mxfp4", stream=mx.cpu).astype(mx.float32))
            want = gate_up[..., rows, :]
            assert got.shape == want.shape and np.array_equal(got, want.astype(np.float32)), m


def test_exact_route_refuses_a_source_it_cannot_represent(tmp_path: Path) -> None:
    recipe = recipe_from_dict({"rules": [{"mode": "affine", "bits": 5, "group_size": 32, "exact": True}]})
    with pytest.raises(FmtconvError, match="exact affine route needs an MXFP4 source"):
        convert(ROOT / "fixtures" / "deepseek-v3-fp8-tiny", tmp_path / "out", recipe=recipe)
    assert not (tmp_path / "out").exists()
