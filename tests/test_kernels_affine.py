"""kernels_ref affine quantize/dequantize vs golden MLX vectors, live MLX, and a plain Metal transliteration."""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
from fmtconv.errors import FmtconvError
from fmtconv.kernels_ref import affine_dequantize, affine_quantize
from fmtconv.kernels_ref.packing import pack_codes, unpack_codes

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
BITS = (2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)


def load(name: str) -> dict:
    with np.load(GOLDEN / f"mlx_{name}.npz") as z:
        out = {}
        for k in z.files:
            if k.endswith("_bf16bits"):
                out[k[: -len("_bf16bits")]] = z[k].view(ml_dtypes.bfloat16)
            else:
                out[k] = z[k]
    return out


@pytest.fixture(scope="module", params=list(DTYPES))
def golden(request):
    return request.param, load(request.param)


def same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def to_mx(a: np.ndarray) -> mx.array:
    return mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == ml_dtypes.bfloat16 else mx.array(a)


def from_mx(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16)).view(ml_dtypes.bfloat16) if a.dtype == mx.bfloat16 else np.array(a)


def mlx_cpu_quantize(w: np.ndarray, gs: int, bits: int):
    with mx.stream(mx.cpu):
        return tuple(from_mx(a) for a in mx.quantize(to_mx(w), gs, bits))


# ---------------------------------------------------------------- golden + live, backend="cpu"

def test_golden_quantize_cpu_byte_identical(golden):
    _, g = golden
    for bits in BITS:
        for gs in GROUPS:
            tag = f"{bits}_{gs}"
            wq, s, b = affine_quantize(g["w"], gs, bits, backend="cpu")
            assert same_bytes(wq, g["wq_" + tag]), tag
            assert same_bytes(s, g["scales_" + tag]), tag
            assert same_bytes(b, g["biases_" + tag]), tag


def test_golden_dequantize_cpu_byte_identical(golden):
    _, g = golden
    for bits in BITS:
        tag = f"{bits}_64"
        out = affine_dequantize(g["wq_" + tag], g["scales_" + tag], g["biases_" + tag], 64, bits, backend="cpu")
        assert same_bytes(out, g["deq_" + tag]), tag


def test_golden_inputs_match_live_mlx(golden):
    _, g = golden
    for bits in BITS:
        for gs in GROUPS:
            live = mlx_cpu_quantize(g["w"], gs, bits)
            ref = affine_quantize(g["w"], gs, bits, backend="cpu")
            assert all(same_bytes(a, b) for a, b in zip(ref, live)), (bits, gs)


def test_golden_was_made_by_this_mlx():
    assert str(load("float32")["mlx_version"]) == mx.__version__


# ---------------------------------------------------------------- backend="metal"

def metal_affine_quantize_plain(w: np.ndarray, group_size: int, bits: int):
    """Line-by-line transliteration of metal/kernels/quantized.h affine_quantize, one group at a time."""
    f32 = np.float32
    dtype = w.dtype
    t_max = float(ml_dtypes.finfo(dtype).max)
    rows = w.reshape(-1, w.shape[-1])
    n_bins = f32((1 << bits) - 1)
    eps = f32(1e-7)

    def metal_round(x: np.float32) -> np.float32:  # round half away from zero, exactly
        a = math.floor(abs(float(x)) + 0.5)
        return f32(math.copysign(a, float(x)))

    words, scales, biases = [], [], []
    for row in rows:
        stream, nbits = 0, 0
        s_row, b_row = [], []
        for g0 in range(0, row.size, group_size):
            grp = [f32(v) for v in row[g0 : g0 + group_size]]
            w_min, w_max = f32(t_max), f32(0)
            for val in grp:
                w_min = min(w_min, val)
                w_max = max(w_max, val)
            scale = max(f32(f32(w_max - w_min) / n_bins), eps)
            side = abs(w_min) > abs(w_max)
            scale = scale if side else f32(-scale)
            edge = w_min if side else w_max
            q0 = metal_round(f32(edge / scale))
            at_zero = q0 == f32(0)
            scale = scale if at_zero else f32(edge / q0)
            bias = f32(0) if at_zero else edge
            s_row.append(scale)
            b_row.append(bias)
            for val in grp:
                q = min(metal_round(f32(f32(val - bias) / scale)), n_bins)
                stream |= int(q) << nbits
                nbits += bits
        words.append(np.frombuffer(stream.to_bytes(nbits // 8, "little"), dtype="<u4"))
        scales.append(s_row)
        biases.append(b_row)
    lead = w.shape[:-1]
    return (
        np.array(words, dtype=np.uint32).reshape(lead + (-1,)),
        np.array(scales, dtype=np.float32).astype(dtype).reshape(lead + (-1,)),
        np.array(biases, dtype=np.float32).astype(dtype).reshape(lead + (-1,)),
    )


def test_metal_matches_plain_transliteration(golden):
    _, g = golden
    w = g["w"][:, :, :128]  # every case, a shorter row keeps the pure-Python loop fast
    for bits in BITS:
        for gs in GROUPS:
            ref = affine_quantize(w, gs, bits, backend="metal")
            plain = metal_affine_quantize_plain(w, gs, bits)
            assert all(same_bytes(a, b) for a, b in zip(ref, plain)), (bits, gs)


def group_has_tie_or_is_negative(w: np.ndarray, gs: int, bits: int) -> np.ndarray:
    """Per group: some exact .5 quotient in the CPU arithmetic (q0 or a code), or all values < 0."""
    from fmtconv.kernels_ref.affine import _params, to_float32

    x = to_float32(w).reshape(-1, gs)
    scale, bias = _params(x.min(axis=1), x.max(axis=1), bits, half_away=False)
    y = (x - bias[:, None]) / scale[:, None]
    tie = (np.abs(y - np.trunc(y)) == 0.5).any(axis=1)
    edge = np.where(np.abs(x.min(axis=1)) > np.abs(x.max(axis=1)), x.min(axis=1), x.max(axis=1))
    q0 = edge / np.maximum((x.max(axis=1) - x.min(axis=1)) / np.float32((1 << bits) - 1), np.float32(1e-7))
    tie |= np.abs(q0 - np.trunc(q0)) == 0.5
    return tie | (x.max(axis=1) < 0)


def test_metal_equals_cpu_off_ties_and_negative_groups(golden):
    _, g = golden
    differing = 0
    for bits in BITS:
        for gs in GROUPS:
            m = affine_quantize(g["w"], gs, bits, backend="metal")
            c = affine_quantize(g["w"], gs, bits, backend="cpu")
            special = group_has_tie_or_is_negative(g["w"], gs, bits)
            codes_m = unpack_codes(m[0], bits).reshape(-1, gs)
            codes_c = unpack_codes(c[0], bits).reshape(-1, gs)
            same = (codes_m == codes_c).all(axis=1)
            same &= (m[1].reshape(-1) == c[1].reshape(-1)) & (m[2].reshape(-1) == c[2].reshape(-1))
            assert same[~special].all(), (bits, gs)
            differing += int((~same).sum())
    assert differing > 0  # the golden cases do exercise the backend difference


# ---------------------------------------------------------------- packing, dequantize, errors

@pytest.mark.parametrize("bits", BITS)
def test_pack_is_one_little_endian_bit_stream(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, (3, 128), dtype=np.uint8)
    words = pack_codes(codes, bits)
    for r in range(3):
        stream = sum(int(c) << (i * bits) for i, c in enumerate(codes[r]))
        assert words[r].astype("<u4").tobytes() == stream.to_bytes(128 * bits // 8, "little")
    assert (unpack_codes(words, bits) == codes).all()


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_cpu_matches_live_mlx(dtype):
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((4, 256)) * 3).astype(np.float32).astype(DTYPES[dtype])
    for bits in BITS:
        for gs in GROUPS:
            wq, s, b = affine_quantize(w, gs, bits, backend="cpu")
            with mx.stream(mx.cpu):
                live = from_mx(mx.dequantize(mx.array(wq), to_mx(s), to_mx(b), gs, bits))
            assert same_bytes(affine_dequantize(wq, s, b, gs, bits, backend="cpu"), live), (bits, gs)


def test_dequantize_metal_is_single_rounding():
    # bf16: q*scale + bias rounded once vs twice differ on some values; metal must equal exact-then-round.
    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 256)).astype(np.float32).astype(ml_dtypes.bfloat16)
    wq, s, b = affine_quantize(w, 64, 4)
    out = affine_dequantize(wq, s, b, 64, 4, backend="metal")
    codes = unpack_codes(wq, 4).reshape(8, 4, 64).astype(np.float64)
    exact = codes * s.astype(np.float64)[..., None] + b.astype(np.float64)[..., None]
    assert same_bytes(out, exact.reshape(8, 256).astype(np.float32).astype(ml_dtypes.bfloat16))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_refuses_non_finite(bad):
    w = np.ones((2, 64), np.float32)
    w[1, 7] = bad
    with pytest.raises(FmtconvError, match="inf/NaN"):
        affine_quantize(w, 64, 4, name="layers.0.w")


@pytest.mark.parametrize(
    "kwargs",
    [dict(group_size=64, bits=7), dict(group_size=16, bits=4), dict(group_size=48, bits=4), dict(group_size=64, bits=4, backend="tpu")],
)
def test_refuses_bad_parameters(kwargs):
    with pytest.raises(FmtconvError):
        affine_quantize(np.zeros((2, 192), np.float32), **kwargs)


def test_refuses_bad_shape_and_dtype():
    with pytest.raises(FmtconvError, match="multiple of group_size"):
        affine_quantize(np.zeros((2, 100), np.float32), 64, 4)
    with pytest.raises(FmtconvError, match="float32, float16 or bfloat16"):
        affine_quantize(np.zeros((2, 64), np.float64), 64, 4)


# ---------------------------------------------------------------- properties vs live MLX

dtype_names = st.sampled_from(list(DTYPES))


@st.composite
def matrices(draw):
    name = draw(dtype_names)
    gs = draw(st.sampled_from(GROUPS))
    bits = draw(st.sampled_from(BITS))
    rows = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    n = rows * groups * gs
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    kind = draw(st.sampled_from(["normal", "grid", "wide"]))
    if kind == "grid":  # coarse grid: exact .5 quotients are frequent
        vals = rng.integers(-16, 17, n) * draw(st.sampled_from([0.125, 0.25, 1.0, 3.0]))
    elif kind == "wide":
        vals = rng.standard_normal(n) * 10.0 ** rng.integers(-8, 5, n)
    else:
        vals = rng.standard_normal(n) * draw(st.floats(1e-6, 1e3))
    w = vals.astype(np.float32).astype(DTYPES[name]).reshape(rows, groups * gs)
    return w, gs, bits


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matrices())
def test_property_cpu_backend_equals_live_mlx(case):
    w, gs, bits = case
    ref = affine_quantize(w, gs, bits, backend="cpu")
    live = mlx_cpu_quantize(w, gs, bits)
    assert all(same_bytes(a, b) for a, b in zip(ref, live))
    deq = affine_dequantize(*ref, gs, bits, backend="cpu")
    with mx.stream(mx.cpu):
        live_deq = from_mx(mx.dequantize(*(to_mx(a) for a in ref), gs, bits))
    assert same_bytes(deq, live_deq)


@settings(max_examples=25, deadline=None)
@given(matrices())
def test_property_metal_equals_plain_transliteration(case):
    w, gs, bits = case
    ref = affine_quantize(w, gs, bits, backend="metal")
    plain = metal_affine_quantize_plain(w, gs, bits)
    assert all(same_bytes(a, b) for a, b in zip(ref, plain))
