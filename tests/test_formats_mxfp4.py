"""MXFP4 codec: nibble order, every published layout from a real-naming file, round trips, exact routes, bad input."""

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
codec = get_codec("mxfp4")


def reference_decode(packed: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Independent decode with ml_dtypes: float4_e2m1fn elements (low nibble first) times float8_e8m0fnu."""
    p = np.asarray(packed).view(np.uint8)
    nib = np.stack([p & 0x0F, p >> 4], axis=-1).reshape(p.shape[:-1] + (-1,))
    elems = nib.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
    sc = np.asarray(codes).view(np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    return (elems.reshape(sc.shape + (32,)) * sc[..., None]).reshape(elems.shape)


def to_mx(a: np.ndarray) -> mx.array:
    """NumPy -> MLX, bfloat16 by its bits (MLX cannot take ml_dtypes buffers)."""
    return mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == BF16 else mx.array(a)


def random_parts(rng, rows: int, k: int, lo: int = 118, hi: int = 130):
    packed = rng.integers(0, 256, size=(rows, k // 2), dtype=np.uint8)
    codes = rng.integers(lo, hi, size=(rows, k // 32), dtype=np.uint8)
    return packed, codes


def load(tmp_path, tensors, config=None):
    path = write_safetensors(tmp_path / "model.safetensors", tensors)
    ckpt = Checkpoint(path)
    return ckpt, find_groups(ckpt.tensors, config or {})


def test_low_nibble_is_the_first_element_in_mlx_and_fmtconv():
    # Byte 0x21: low nibble 1 (0.5) is element 0, high nibble 2 (1.0) element 1.
    b = np.zeros((1, 16), np.uint8)
    b[0, 0] = 0x21
    codes = np.full((1, 1), 127, np.uint8)
    mlx = np.array(mx.dequantize(mx.array(b.view("<u4")), mx.array(codes), mode="mxfp4", dtype=mx.float32))
    g = SourceGroup("x.weight", "mxfp4", {"weight": "w", "scale": "s"}, (1, 32), {"layout": "deepseek_v4"})
    ours = codec.decode({"weight": b.view(np.int8), "scale": codes}, g, compute_dtype=BF16).values
    assert mlx[0, :3].tolist() == [0.5, 1.0, 0.0]
    assert ours[0, :3].tolist() == [0.5, 1.0, 0.0]


def test_mlx_quantize_bytes_decode_like_mx_dequantize():
    w = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    wq, sc = (np.array(a) for a in mx.quantize(mx.array(w), mode="mxfp4"))
    g = SourceGroup("x.weight", "mxfp4", {"weight": "x.weight", "scale": "x.scales"}, (8, 128), {"layout": "mlx"})
    got = codec.decode({"weight": wq, "scale": sc}, g, compute_dtype=BF16).values
    ref = np.array(mx.dequantize(mx.array(wq), mx.array(sc), mode="mxfp4", dtype=mx.float32))
    assert np.array_equal(got.view(np.uint32), ref.view(np.uint32))


def test_deepseek_v4_expert_layout(tmp_path):
    rng = np.random.default_rng(1)
    packed, codes = random_parts(rng, 64, 128)
    tensors = {
        "layers.0.ffn.experts.3.w1.weight": packed.view(np.int8),
        "layers.0.ffn.experts.3.w1.scale": codes.view(ml_dtypes.float8_e8m0fnu),
        "layers.0.ffn.norm.weight": np.ones(16, dtype=ml_dtypes.bfloat16),
    }
    ckpt, groups = load(tmp_path, tensors, {"expert_dtype": "fp4"})
    g = next(g for g in groups if g.codec == "mxfp4")
    assert g.name == "layers.0.ffn.experts.3.w1.weight" and g.shape == (64, 128)
    assert g.params["layout"] == "deepseek_v4"
    assert ckpt.info(g.parts["weight"]).dtype == "I8" and ckpt.info(g.parts["scale"]).dtype == "F8_E8M0"
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    assert np.array_equal(exact.values, reference_decode(packed, codes))
    again = codec.encode(exact, layout="deepseek_v4", scale=parts["scale"])
    assert again["weight"].dtype == np.int8 and again["weight"].tobytes() == packed.tobytes()
    assert again["scale"].dtype == ml_dtypes.float8_e8m0fnu and again["scale"].tobytes() == codes.tobytes()
    # Row blocks decode to slices of the whole.
    part = codec.decode(parts, g, compute_dtype=BF16, rows=(10, 27)).values
    assert np.array_equal(part, exact.values[10:27])


def test_gpt_oss_layout(tmp_path):
    rng = np.random.default_rng(2)
    packed, codes = random_parts(rng, 2 * 6, 64)
    blocks = packed.reshape(2, 6, 2, 16)
    tensors = {
        "model.layers.0.mlp.experts.gate_up_proj_blocks": blocks,
        "model.layers.0.mlp.experts.gate_up_proj_scales": codes.reshape(2, 6, 2),
        "model.layers.0.mlp.experts.gate_up_proj_bias": np.zeros((2, 6), np.float32),
    }
    ckpt, groups = load(tmp_path, tensors)
    g = next(g for g in groups if g.codec == "mxfp4")
    assert g.name == "model.layers.0.mlp.experts.gate_up_proj" and g.shape == (2, 6, 64)
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    # gpt-oss' own formula: ldexp(lut[nibble], scale - 127), lut index low nibble -> even position.
    lut = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    nib = np.stack([blocks & 15, blocks >> 4], -1).reshape(2, 6, 2, 32)
    want = np.ldexp(lut[nib], codes.reshape(2, 6, 2, 1).astype(np.int32) - 127).reshape(12, 64)
    assert np.array_equal(exact.values, want)
    again = codec.encode(exact.values.reshape(2, 6, 64), layout="gpt_oss", scale=parts["scale"])
    assert np.array_equal(again["weight"], blocks) and np.array_equal(again["scale"], codes.reshape(2, 6, 2))


def test_compressed_tensors_mxfp4_layout(tmp_path):
    rng = np.random.default_rng(3)
    packed, codes = random_parts(rng, 32, 64)
    tensors = {"model.layers.0.mlp.experts.0.gate_proj.weight_packed": packed, "model.layers.0.mlp.experts.0.gate_proj.weight_scale": codes}
    cfg = {"quantization_config": {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized"}}
    ckpt, groups = load(tmp_path, tensors, cfg)
    (g,) = groups
    assert (g.codec, g.name, g.shape, g.params["layout"]) == ("mxfp4", "model.layers.0.mlp.experts.0.gate_proj.weight", (32, 64), "compressed_tensors")
    parts = {r: ckpt.array(n) for r, n in g.parts.items()}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    assert np.array_equal(exact.values, reference_decode(packed, codes))
    assert codec.encode(exact, layout="compressed_tensors", scale=codes)["weight"].tobytes() == packed.tobytes()


@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(["deepseek_v4", "gpt_oss", "compressed_tensors", "mlx"]),
    rows=st.integers(1, 5),
    groups=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_same_scales_same_bytes(layout, rows, groups, seed):
    rng = np.random.default_rng(seed)
    k = 32 * groups
    packed, codes = random_parts(rng, rows, k, lo=0, hi=253)
    shape = (rows, k)
    stored = codec._pack(packed, codes, layout)
    g = SourceGroup("x", "mxfp4", {"weight": "w", "scale": "s"}, shape, {"layout": layout})
    exact = codec.decode(stored, g, compute_dtype=BF16)
    again = codec.encode(exact, layout=layout, scale=stored["scale"])
    for role in ("weight", "scale"):
        assert again[role].dtype == stored[role].dtype and again[role].tobytes() == stored[role].tobytes()


def test_repack_to_mlx_is_lossless_for_every_layout():
    rng = np.random.default_rng(4)
    packed, codes = random_parts(rng, 6, 64)
    for layout in ("deepseek_v4", "gpt_oss", "compressed_tensors"):
        stored = codec._pack(packed, codes, layout)
        g = SourceGroup("x", "mxfp4", {"weight": "w", "scale": "s"}, (6, 64), {"layout": layout})
        mlx_parts = codec.repack_to_mlx(stored, g)
        assert mlx_parts["weight"].dtype == np.uint32 and mlx_parts["weight"].shape == (6, 8)
        got = np.array(mx.dequantize(mx.array(mlx_parts["weight"]), mx.array(mlx_parts["scales"]), mode="mxfp4", dtype=mx.float32))
        assert np.array_equal(got, reference_decode(packed, codes))


def test_exact_affine5_route_matches_bit_for_bit():
    rng = np.random.default_rng(5)
    packed, codes = random_parts(rng, 16, 128, lo=100, hi=140)
    g = SourceGroup("x", "mxfp4", {"weight": "w", "scale": "s"}, (16, 128), {"layout": "compressed_tensors"})
    parts = {"weight": packed, "scale": codes}
    exact = codec.decode(parts, g, compute_dtype=BF16)
    aff = codec.to_affine5(parts, g, compute_dtype=BF16)
    assert aff["scales"].dtype == BF16 and aff["weight"].shape == (16, 128 * 5 // 32)
    got = np.array(mx.dequantize(mx.array(aff["weight"]), to_mx(aff["scales"]), to_mx(aff["biases"]), group_size=32, bits=5, dtype=mx.float32))
    want = exact.to()
    assert np.array_equal(got.astype(np.float32), want.astype(np.float32))  # as values (-0 comes back +0)
    canon = lambda a: np.where(a == 0, 0, a).astype(BF16).view(np.uint16)  # noqa: E731
    assert np.array_equal(canon(got.astype(np.float32)), canon(want.astype(np.float32)))  # bit for bit, -0 as +0
    # Streaming row blocks give the same bytes.
    part = codec.to_affine5(parts, g, compute_dtype=BF16, rows=(3, 9))
    assert np.array_equal(part["weight"], aff["weight"][3:9]) and np.array_equal(part["biases"], aff["biases"][3:9])


def test_exact_affine5_route_refuses_what_float16_cannot_hold():
    packed = np.full((1, 16), 0x77, np.uint8)  # 6.0 everywhere
    g = SourceGroup("x", "mxfp4", {"weight": "w", "scale": "s"}, (1, 32), {"layout": "compressed_tensors"})
    ok = codec.to_affine5({"weight": packed, "scale": np.array([[120]], np.uint8)}, g, compute_dtype=np.float16)
    assert ok["scales"].dtype == np.float16
    for code in (60, 200):  # scale 2^-68 underflows float16; 6 * 2^73 overflows it
        with pytest.raises(FmtconvError, match="not exact in float16"):
            codec.to_affine5({"weight": packed, "scale": np.array([[code]], np.uint8)}, g, compute_dtype=np.float16)


def test_bad_input_is_refused_with_the_tensor_named(tmp_path):
    g = SourceGroup("e.weight", "mxfp4", {"weight": "e.weight", "scale": "e.scale"}, (2, 64), {"layout": "deepseek_v4"})
    packed, codes = random_parts(np.random.default_rng(6), 2, 64)
    bad = codes.copy()
    bad[1, 1] = 255
    with pytest.raises(FmtconvError, match="'e.scale'.*code 255"):
        codec.decode({"weight": packed, "scale": bad}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'e.weight'.*expected 64 bytes"):
        codec.decode({"weight": packed.reshape(-1)[:60], "scale": codes}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="'e.scale'.*expected shape"):
        codec.decode({"weight": packed, "scale": codes.reshape(4, 1)}, g, compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="missing the scale"):
        codec.decode({"weight": packed}, g, compute_dtype=BF16)
    # In a file: a scale of the wrong shape, an orphan scale, a packed weight without its scale.
    with pytest.raises(FmtconvError, match="'layers.0.ffn.experts.0.w1.scale'.*expected shape"):
        load(tmp_path, {"layers.0.ffn.experts.0.w1.weight": packed.view(np.int8), "layers.0.ffn.experts.0.w1.scale": codes[:, :1].copy().view(ml_dtypes.float8_e8m0fnu)})
    with pytest.raises(FmtconvError, match="'m.x_scales'"):
        load(tmp_path, {"m.x_scales": codes})
    with pytest.raises(FmtconvError, match="'layers.0.ffn.experts.0.w2.weight'"):
        load(tmp_path, {"layers.0.ffn.experts.0.w2.weight": packed.view(np.int8)})
