"""FP8 block codec: DeepSeek-V3 (float32 scale_inv), DeepSeek-V4 (E8M0), compressed-tensors per-channel."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.deepseek_v3 import Model as DeepseekV3Model

from fmtconv.errors import FmtconvError
from fmtconv.formats import SourceGroup, find_groups, get_codec
from fmtconv.formats.safetensors_io import Checkpoint, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
codec = get_codec("fp8_block")


def fp8_weight(rng, shape):
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x42  # no NaN codes
    return codes.view(ml_dtypes.float8_e4m3fn)


def load(tmp_path, tensors, config=None):
    ckpt = Checkpoint(write_safetensors(tmp_path / "model.safetensors", tensors))
    groups = find_groups(ckpt.tensors, config or {})
    return ckpt, groups


def test_deepseek_v3_scale_inv_edges_and_mlx_lm_sanitize(tmp_path):
    rng = np.random.default_rng(0)
    w = fp8_weight(rng, (200, 300))  # partial 128-blocks on both axes
    s = (rng.random((2, 3)) * 1e-3 + 1e-4).astype(np.float32)
    tensors = {"model.layers.0.self_attn.o_proj.weight": w, "model.layers.0.self_attn.o_proj.weight_scale_inv": s}
    ckpt, (g,) = load(tmp_path, tensors, {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert (g.codec, g.name, g.shape, g.params["block"], g.params["layout"]) == ("fp8_block", "model.layers.0.self_attn.o_proj.weight", (200, 300), (128, 128), "deepseek_v3")
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    assert exact.values.dtype == np.float64
    # Exact: every product equals the rational product of the E4M3 value and the float32 scale.
    e = w.astype(np.float64)
    sc = np.repeat(np.repeat(s, 128, 0), 128, 1)[:200, :300].astype(np.float64)
    for i, j in zip(rng.integers(0, 200, 300), rng.integers(0, 300, 300)):
        assert Fraction(float(exact.values[i, j])) == Fraction(float(e[i, j])) * Fraction(float(sc[i, j]))
    # mlx_lm's own FP8 dequantization (sanitize of deepseek_v3) rounds via float32: our compatible path matches.
    stub = SimpleNamespace(args=SimpleNamespace(num_hidden_layers=0))
    out = DeepseekV3Model.sanitize(stub, {"a.weight": mx.array(w.view(np.uint8)), "a.weight_scale_inv": mx.array(s)})
    ref = np.array(out["a.weight"].view(mx.uint16)).view(BF16)
    assert np.array_equal(exact.to(like_mlx_lm=True).view(np.uint16), ref.view(np.uint16))
    # Streaming rows cross block boundaries correctly.
    assert np.array_equal(codec.decode(parts, g, compute_dtype=BF16, rows=(100, 170)).values, exact.values[100:170])


def test_deepseek_v4_ue8m0_scales(tmp_path):
    rng = np.random.default_rng(1)
    w = fp8_weight(rng, (256, 130))
    s = rng.integers(110, 130, size=(2, 2), dtype=np.uint8)
    tensors = {"layers.0.attn.wq_b.weight": w, "layers.0.attn.wq_b.scale": s.view(ml_dtypes.float8_e8m0fnu)}
    ckpt, (g,) = load(tmp_path, tensors, {"quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}})
    assert g.params["scale_kind"] == "e8m0" and g.params["layout"] == "deepseek_v4"
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    assert exact.values.dtype == np.float32
    sc = np.repeat(np.repeat(s.view(ml_dtypes.float8_e8m0fnu).astype(np.float32), 128, 0), 128, 1)[:256, :130]
    assert np.array_equal(exact.values, w.astype(np.float32) * sc)
    again = codec.encode(exact, block=(128, 128), scale_kind="e8m0", scale=parts["scale"])
    assert again["weight"].tobytes() == w.tobytes() and again["scale"].tobytes() == s.tobytes()


def test_compressed_tensors_per_channel(tmp_path):
    rng = np.random.default_rng(2)
    w = fp8_weight(rng, (16, 64))
    s = (rng.random((16, 1)) + 0.5).astype(ml_dtypes.bfloat16)
    tensors = {"model.layers.0.mlp.down_proj.weight": w, "model.layers.0.mlp.down_proj.weight_scale": s}
    ckpt, (g,) = load(tmp_path, tensors, {"quantization_config": {"quant_method": "compressed-tensors", "format": "float-quantized"}})
    assert g.params["block"] == (1, 64) and g.params["layout"] == "compressed_tensors"
    exact = codec.decode({r: ckpt.array(n) for r, n in g.parts.items()}, g, compute_dtype=BF16)
    assert np.array_equal(exact.values, w.astype(np.float64) * s.astype(np.float64))


@settings(max_examples=25, deadline=None)
@given(
    out=st.integers(1, 300),
    k=st.integers(1, 260),
    block=st.sampled_from([(128, 128), (32, 32), (1, 1 << 20)]),
    kind=st.sampled_from(["float", "e8m0"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_same_scales_same_bytes(out, k, block, kind, seed):
    rng = np.random.default_rng(seed)
    w = fp8_weight(rng, (out, k))
    block = (block[0], min(block[1], k))
    gshape = (-(-out // block[0]), -(-k // block[1]))
    if kind == "float":
        s = (rng.random(gshape) * 2.0 ** rng.integers(-20, 5)).astype(np.float32) + np.float32(1e-30)
    else:
        s = rng.integers(100, 140, size=gshape, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
    g = SourceGroup("x.weight", "fp8_block", {"weight": "x.weight", "scale": "x.s"}, (out, k), {"block": block, "scale_kind": kind})
    exact = codec.decode({"weight": w, "scale": s}, g, compute_dtype=BF16)
    again = codec.encode(exact, block=block, scale_kind=kind, scale=s)
    assert again["weight"].tobytes() == w.tobytes() and again["scale"].tobytes() == s.tobytes()


def test_encode_without_scales_picks_block_amax():
    v = np.random.default_rng(3).standard_normal((130, 140))
    parts = codec.encode(v, block=(128, 128))
    assert parts["scale"].shape == (2, 2) and parts["scale"].dtype == np.float32
    g = SourceGroup("x.weight", "fp8_block", {}, (130, 140), {"block": (128, 128)})
    back = codec.decode(parts, g, compute_dtype=BF16).values
    assert np.abs(back - v).max() < 0.07 * np.abs(v).max()


def test_bad_input_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    w = fp8_weight(rng, (130, 64))
    g = SourceGroup("a.weight", "fp8_block", {"weight": "a.weight", "scale": "a.weight_scale_inv"}, (130, 64), {"block": (128, 128)})
    with pytest.raises(FmtconvError, match="'a.weight_scale_inv'.*non-finite"):
        codec.decode({"weight": w, "scale": np.array([[np.nan], [1.0]], np.float32)}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'a.weight_scale_inv'.*expected shape \\(2, 1\\)"):
        codec.decode({"weight": w, "scale": np.ones((3, 1), np.float32)}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'a.weight_scale_inv'.*code 255"):
        ge = SourceGroup("a.weight", "fp8_block", g.parts, (130, 64), {"block": (128, 128), "scale_kind": "e8m0"})
        codec.decode({"weight": w, "scale": np.array([[255], [1]], np.uint8)}, ge, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'x.weight'.*without a scale"):
        load(tmp_path, {"x.weight": w})
    with pytest.raises(FmtconvError, match="'x.weight_scale_inv'.*fits no block"):
        load(tmp_path, {"x.weight": w, "x.weight_scale_inv": np.ones((3, 3), np.float32)})
    with pytest.raises(FmtconvError, match="'y.weight_scale_inv'"):
        load(tmp_path, {"y.weight_scale_inv": np.ones((1, 1), np.float32)})
