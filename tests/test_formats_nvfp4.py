"""NVFP4 codec: ModelOpt (multiply by weight_scale_2) and compressed-tensors (divide by weight_global_scale)."""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmtconv.errors import FmtconvError
from fmtconv.formats import SourceGroup, find_groups, get_codec
from fmtconv.formats.safetensors_io import Checkpoint, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
codec = get_codec("nvfp4")


def random_parts(rng, rows, k):
    packed = rng.integers(0, 256, size=(rows, k // 2), dtype=np.uint8)
    scale = rng.integers(0x20, 0x70, size=(rows, k // 16), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    return packed, scale


def reference(packed, scale):
    """ml_dtypes: float4_e2m1fn elements (low nibble first) times float8_e4m3fn block scales, float64."""
    nib = np.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)
    e = nib.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    return (e.reshape(scale.shape + (16,)) * scale.astype(np.float64)[..., None]).reshape(e.shape)


def load(tmp_path, tensors, config):
    ckpt = Checkpoint(write_safetensors(tmp_path / "model.safetensors", tensors))
    return ckpt, find_groups(ckpt.tensors, config)


def test_modelopt_multiplies_weight_scale_2(tmp_path):
    rng = np.random.default_rng(0)
    packed, scale = random_parts(rng, 32, 64)
    ws2 = np.array(0.0123, np.float32)
    p = "model.layers.0.mlp.down_proj"
    tensors = {f"{p}.weight": packed, f"{p}.weight_scale": scale, f"{p}.weight_scale_2": ws2, f"{p}.input_scale": np.array(0.5, np.float32)}
    ckpt, (g,) = load(tmp_path, tensors, {"quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}})
    assert (g.codec, g.name, g.shape, g.params["layout"]) == ("nvfp4", f"{p}.weight", (32, 64), "modelopt")
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    assert np.array_equal(exact.values, reference(packed, scale) * np.float64(ws2))
    # MLX's nvfp4 mode reads the same bytes with global_scale = weight_scale_2 * 6 * 448 (mlx_lm muse_spark sanitize).
    mlx = np.array(mx.dequantize(mx.array(packed.view("<u4")), mx.array(scale.view(np.uint8)), mode="nvfp4",
                                 global_scale=mx.array(np.float32(ws2 * np.float32(2688))), dtype=mx.float32))
    np.testing.assert_allclose(mlx, exact.values, rtol=2e-7, atol=0)
    again = codec.encode(exact, layout="modelopt", scale=parts["scale"], global_scale=ws2)
    assert again["weight"].tobytes() == packed.tobytes() and again["scale"].tobytes() == scale.tobytes()
    assert again["global_scale"].shape == () and again["global_scale"] == ws2


def test_compressed_tensors_divides_by_weight_global_scale(tmp_path):
    rng = np.random.default_rng(1)
    packed, scale = random_parts(rng, 16, 32)
    gs = np.array([2688.0 / 3.7], np.float32)
    p = "model.layers.0.self_attn.q_proj"
    tensors = {f"{p}.weight_packed": packed, f"{p}.weight_scale": scale, f"{p}.weight_global_scale": gs, f"{p}.input_global_scale": gs}
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized"}}
    ckpt, (g,) = load(tmp_path, tensors, cfg)
    assert (g.codec, g.name, g.params["layout"]) == ("nvfp4", f"{p}.weight", "compressed_tensors")
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    assert np.array_equal(exact.values, reference(packed, scale) / np.float64(gs[0]))
    # MLX's convention is an amax: global = 6 * 448 / weight_global_scale.
    mlx = np.array(mx.dequantize(mx.array(packed.view("<u4")), mx.array(scale.view(np.uint8)), mode="nvfp4",
                                 global_scale=mx.array(np.float32(2688) / gs[0]), dtype=mx.float32))
    np.testing.assert_allclose(mlx, exact.values, rtol=4e-7, atol=0)
    again = codec.encode(exact, layout="compressed_tensors", scale=parts["scale"], global_scale=gs)
    assert again["weight"].tobytes() == packed.tobytes() and again["global_scale"].tobytes() == gs.tobytes()


@settings(max_examples=25, deadline=None)
@given(layout=st.sampled_from(["modelopt", "compressed_tensors"]), rows=st.integers(1, 6), k=st.sampled_from([16, 32, 96]),
       g=st.floats(1e-6, 1e6, allow_nan=False), seed=st.integers(0, 2**32 - 1))
def test_round_trip_same_scales_same_bytes(layout, rows, k, g, seed):
    packed, scale = random_parts(np.random.default_rng(seed), rows, k)
    gs = np.array(g, np.float32).reshape(() if layout == "modelopt" else (1,))
    grp = SourceGroup("x.weight", "nvfp4", {}, (rows, k), {"layout": layout})
    exact = codec.decode({"weight": packed, "scale": scale, "global_scale": gs}, grp, compute_dtype=BF16)
    again = codec.encode(exact, layout=layout, scale=scale, global_scale=gs)
    assert again["weight"].tobytes() == packed.tobytes() and again["scale"].tobytes() == scale.tobytes()


def test_encode_without_scales_is_close():
    v = np.random.default_rng(2).standard_normal((8, 64))
    for layout in ("modelopt", "compressed_tensors"):
        parts = codec.encode(v, layout=layout)
        back = codec.decode(parts, SourceGroup("x", "nvfp4", {}, (8, 64), {"layout": layout}), compute_dtype=BF16).values
        assert np.abs(back - v).max() < 0.3 * np.abs(v).max()


def test_bad_input_is_refused(tmp_path):
    packed, scale = random_parts(np.random.default_rng(3), 4, 32)
    g = SourceGroup("m.weight", "nvfp4", {"weight": "m.weight", "scale": "m.weight_scale", "global_scale": "m.weight_scale_2"}, (4, 32), {"layout": "modelopt"})
    with pytest.raises(FmtconvError, match="'m.weight_scale_2'.*finite nonzero"):
        codec.decode({"weight": packed, "scale": scale, "global_scale": np.array(np.inf, np.float32)}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'m.weight_scale'.*expected shape"):
        codec.decode({"weight": packed, "scale": scale.reshape(2, 4), "global_scale": np.array(1, np.float32)}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="missing the global_scale"):
        codec.decode({"weight": packed, "scale": scale}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'m.weight_scale'.*expected F8_E4M3"):
        load(tmp_path, {"m.weight": packed, "m.weight_scale": np.ones((4, 1), np.float32), "m.weight_scale_2": np.array(1, np.float32)}, {})
    with pytest.raises(FmtconvError, match="'m.weight_global_scale'"):
        load(tmp_path, {"m.weight_global_scale": np.ones(1, np.float32)}, {})
