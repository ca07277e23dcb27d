"""kernels_ref tables and mxfp4/mxfp8/nvfp4 vs golden MLX vectors, live MLX and a plain Metal transliteration."""

from __future__ import annotations

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mlx.core as mx
from fmtconv.errors import FmtconvError
from fmtconv.kernels_ref import tables
from fmtconv.kernels_ref.tables import ceil_log2, ceil_log2_ratio, floor_log2, round_log2
from fmtconv.kernels_ref import (
    E2M1_VALUES,
    e2m1_decode,
    e2m1_encode,
    e4m3_decode,
    e4m3_encode,
    e8m0_decode,
    e8m0_encode,
    fp_dequantize,
    fp_quantize,
    pack_fp4,
    unpack_fp4,
)
from test_kernels_affine import DTYPES, from_mx, golden, same_bytes, to_mx  # noqa: F401  (fixture)

MODES = ("mxfp4", "mxfp8", "nvfp4")


# ---------------------------------------------------------------- tables

def test_e2m1_table_and_roundtrip():
    assert E2M1_VALUES.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    codes = np.arange(16, dtype=np.uint8)
    assert (e2m1_encode(e2m1_decode(codes)) == codes).all()


def test_e2m1_encode_ties_to_even_and_saturates():
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.1, -5.0, np.nan], np.float32)
    assert e2m1_encode(x).tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 8, 14, 7]


def test_fp4_pack_low_nibble_first():
    codes = np.array([[1, 2, 3, 4]], np.uint8)
    assert pack_fp4(codes).tolist() == [[0x21, 0x43]]
    assert (unpack_fp4(pack_fp4(codes)) == codes).all()


def test_e4m3_matches_mlx_to_from_fp8():
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.standard_normal(20000) * 10.0 ** rng.integers(-4, 4, 20000), [448, 460, 464, 1e9, -1e9, 2**-10, 0.0, -0.0]]
    ).astype(np.float32)
    assert (e4m3_encode(x) == np.array(mx.to_fp8(mx.array(x)))).all()
    codes = np.arange(256, dtype=np.uint8)
    live = np.array(mx.from_fp8(mx.array(codes), mx.float32))
    assert np.array_equal(e4m3_decode(codes), live, equal_nan=True)


def test_e8m0():
    assert e8m0_decode(np.array([0, 127, 254, 255], np.uint8), like_mlx=True).tolist() == [2.0**-127, 1.0, 2.0**127, math.inf]
    assert math.isnan(e8m0_decode(np.array([255], np.uint8))[0])
    x = np.array([0, 1, 1.5, 2, 2.0000002, 2.0**-140, 1e38, np.inf, -1], np.float32)
    assert e8m0_encode(x).tolist() == [0, 127, 128, 128, 129, 0, 254, 255, 0]
    # float32(1.4142135) lies below sqrt(2), so its log2 rounds to 0 (a float32 log2 may say 0.5).
    assert e8m0_encode(np.array([1.4142135, 1.4142137, 1.5], np.float32), rounding="nearest").tolist() == [127, 128, 128]


def exact_floor_log2(x: Fraction) -> int:
    """floor(log2(x)) of a positive rational, by integer comparisons only."""
    k = x.numerator.bit_length() - x.denominator.bit_length()
    while Fraction(2) ** k > x:
        k -= 1
    while Fraction(2) ** (k + 1) <= x:
        k += 1
    return k


def exact_e8m0(x: float, rounding: str) -> int:
    """The E8M0 code from the rational value of x: smallest 2^k >= x, or the k nearest log2(x) (x^2 vs 2^(2k+1))."""
    f = Fraction(float(x))
    k = exact_floor_log2(f)
    if rounding == "up":
        k += Fraction(2) ** k < f
    else:
        k += f * f > Fraction(2) ** (2 * k + 1)
    return max(-127, min(127, k)) + 127


def tie_sensitive_floats(dtype) -> np.ndarray:
    """Floats at and a few ulp around 2^k and sqrt(2) 2^k, where a float log2 decides wrongly."""
    out = []
    for k in range(-126, 127, 3):
        for c in (2.0**k, math.sqrt(2) * 2.0**k):
            v = dtype(c)
            if not np.isfinite(v) or v == 0:
                continue
            out.append(v)
            lo = hi = v
            for _ in range(4):
                lo, hi = np.nextafter(lo, dtype(0)), np.nextafter(hi, dtype(np.inf))
                out += [lo, hi]
    return np.array([v for v in out if np.isfinite(v) and v > 0], dtype)


@pytest.mark.parametrize("rounding", ["up", "nearest"])
def test_e8m0_encode_is_exact_at_every_tie_sensitive_float(rounding):
    x = tie_sensitive_floats(np.float32)
    got = e8m0_encode(x, rounding=rounding)
    assert got.tolist() == [exact_e8m0(v, rounding) for v in x]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exponent_helpers_are_exact(dtype):
    x = tie_sensitive_floats(dtype)
    assert floor_log2(x).tolist() == [exact_floor_log2(Fraction(float(v))) for v in x]
    for v, c, r in zip(x, ceil_log2(x), round_log2(x)):
        f, k = Fraction(float(v)), exact_floor_log2(Fraction(float(v)))
        assert c == k + (Fraction(2) ** k < f)
        assert r == k + (f * f > Fraction(2) ** (2 * k + 1))
    for den in (6.0, 448.0, 0.75):
        for v, k in zip(x, ceil_log2_ratio(x, den)):
            q = Fraction(float(v)) / Fraction(den)
            assert Fraction(2) ** (int(k) - 1) < q <= Fraction(2) ** int(k)
    assert Fraction(tables._SQRT_HALF) ** 2 > Fraction(1, 2)  # so m == _SQRT_HALF rounds up
    assert np.nextafter(tables._SQRT_HALF, 0) ** 2 < 0.5


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_mxfp4_scales_match_live_mlx_at_tie_sensitive_amax(dtype):
    """amax/6 at and around 2^k and sqrt(2) 2^k: the scale MLX 0.32.4 picks on the CPU, byte for byte."""
    np_dt = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    amax = tie_sensitive_floats(np.float32).astype(np.float64) * 6
    amax = amax[(amax > 2.0**-100) & (amax < 2.0**100)]
    if dtype == "float16":
        amax = amax[(amax > 2.0**-10) & (amax < 6e4)]
    w = np.zeros((amax.size, 32), np.float64)
    w[:, 0], w[:, 5], w[:, 31] = amax, -amax / 3, amax / 7
    w = w.astype(np.float32).astype(np_dt)
    wq, s = fp_quantize(w, "mxfp4", backend="cpu")
    live_wq, live_s = mx.quantize(mx.array(w.astype(np.float32)).astype(getattr(mx, dtype)), mode="mxfp4")
    assert same_bytes(s, np.array(live_s)) and same_bytes(wq, np.array(live_wq))


# ---------------------------------------------------------------- modes vs MLX (CPU)

def test_golden_fp_cpu_byte_identical(golden):
    name, g = golden
    w = g["w"][:, :4]
    for mode in MODES:
        wq, s = fp_quantize(w, mode, backend="cpu")
        assert same_bytes(wq, g["fp_wq_" + mode]), mode
        assert same_bytes(s, g["fp_scales_" + mode]), mode
        deq = fp_dequantize(g["fp_wq_" + mode], g["fp_scales_" + mode], mode, dtype=DTYPES[name], backend="cpu")
        assert same_bytes(deq, g["fp_deq_" + mode]), mode


def live(w: np.ndarray, mode: str, global_scale: float | None):
    kw = {} if global_scale is None else {"global_scale": mx.array(np.float32(global_scale))}
    with mx.stream(mx.cpu):
        wq, s = mx.quantize(to_mx(w), mode=mode, **kw)
        deq = mx.dequantize(wq, s, mode=mode, dtype=to_mx(w).dtype, **kw)
    return np.array(wq), np.array(s), from_mx(deq)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(list(DTYPES)),
    st.sampled_from(MODES),
    st.sampled_from(["normal", "grid", "wide"]),
    st.integers(0, 2**32 - 1),
    st.sampled_from([None, 0.37, 1.0, 2500.0]),
)
def test_property_fp_cpu_equals_live_mlx(dtype, mode, kind, seed, global_scale):
    if mode != "nvfp4":
        global_scale = None
    rng = np.random.default_rng(seed)
    n = 2 * 64
    if kind == "grid":  # E2M1 ties and exact powers of two
        vals = rng.integers(-24, 25, n) * 0.25
    elif kind == "wide":
        vals = rng.standard_normal(n) * 10.0 ** rng.integers(-9, 5, n // 32).repeat(32)
    else:
        vals = rng.standard_normal(n)
    w = vals.astype(np.float32).astype(DTYPES[dtype]).reshape(2, 64)
    wq, s, deq = live(w, mode, global_scale)
    ref_wq, ref_s = fp_quantize(w, mode, global_scale=global_scale, backend="cpu")
    assert same_bytes(ref_wq, wq) and same_bytes(ref_s, s)
    ref_deq = fp_dequantize(wq, s, mode, dtype=DTYPES[dtype], global_scale=global_scale, backend="cpu")
    assert same_bytes(ref_deq, deq)


def test_fp_refuses_bad_input():
    with pytest.raises(FmtconvError):
        fp_quantize(np.full((1, 32), np.nan, np.float32), "mxfp4")
    with pytest.raises(FmtconvError):
        fp_quantize(np.zeros((1, 48), np.float32), "mxfp8")
    with pytest.raises(FmtconvError):
        fp_quantize(np.zeros((1, 32), np.float32), "int4")
    with pytest.raises(FmtconvError):
        fp_quantize(np.zeros((1, 32), np.float32), "mxfp4", global_scale=1.0)


# ---------------------------------------------------------------- backend="metal"

def metal_fp_quantize_plain(w: np.ndarray, mode: str, global_scale: float | None = None):
    """Per-element transliteration of MLX 0.32.4 metal/kernels/fp_quantized.h fp_quantize."""
    f32 = np.float32
    gs, bits = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}[mode]
    x = w.astype(np.float32).reshape(-1, gs)
    scale_enc = f32(1) if global_scale is None else f32(f32(448 * 6) / f32(global_scale))
    codes, scodes = [], []
    for grp in x:
        s = f32(max(abs(v) for v in grp) / f32(6 if bits == 4 else 448))
        if global_scale is not None:
            s = f32(s * scale_enc)
        if gs == 32:  # fp8_e8m0(x), then mx_scale_round_up
            n = -127 if s == 0 else exact_e8m0(s, "nearest") - 127  # round(log2(s)), decided exactly
            if n < 127 and 2.0**n < s:
                n += 1
            q_scale, dec = n + 127, f32(2.0**n)
        else:
            q_scale = int(e4m3_encode(np.array([s]))[0])
            dec = e4m3_decode(np.array([q_scale], np.uint8))[0]
        scodes.append(q_scale)
        enc_b = f32(0) if dec == 0 else f32(scale_enc / dec)
        for v in grp:
            y = f32(v * enc_b)
            codes.append(int(e4m3_encode(np.array([y]))[0]) if bits == 8 else int(e2m1_encode(np.array([y]))[0]))
    c = np.array(codes, np.uint8).reshape(w.shape)
    packed = pack_fp4(c) if bits == 4 else c
    return packed.view("<u4").astype(np.uint32), np.array(scodes, np.uint8).reshape(w.shape[:-1] + (-1,))


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("mode", MODES)
def test_metal_fp_matches_plain_transliteration(golden, mode):
    _, g = golden
    w = g["w"][:, :, :64]
    gsc = 0.5 if mode == "nvfp4" else None
    for global_scale in {None, gsc}:
        ref = fp_quantize(w, mode, global_scale=global_scale, backend="metal")
        plain = metal_fp_quantize_plain(w, mode, global_scale)
        assert same_bytes(ref[0], plain[0]) and same_bytes(ref[1], plain[1]), global_scale
