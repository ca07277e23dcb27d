"""The compiled kernels (fmtconv.kernels, numba) write the same bytes as the NumPy references in kernels_ref.

Every bits x group size x dtype x backend, on the golden MLX inputs (ties and all-negative groups among
them), on generated matrices that make ties frequent, on MXFP4 rows with degenerate blocks and extreme
scales, and on FP8 rows with E8M0 and float scales whose products land on bfloat16 ties; inf/NaN input
is refused (affine) or handed back to the NumPy route (None) exactly where the reference refuses it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

import fmtconv.kernels as kernels
from fmtconv import kernels_ref
from fmtconv.errors import FmtconvError
from fmtconv.formats import get_codec
from fmtconv.formats.base import SourceGroup
from fmtconv.kernels import affine as fast_affine
from fmtconv.kernels._jit import numba_available
from fmtconv.kernels import fp8 as fast_fp8
from fmtconv.kernels import mxfp4 as fast_mxfp4
from fmtconv.kernels import packing as fast_packing
from fmtconv.kernels_ref.packing import pack_codes
from fmtconv.kernels_ref.table_driven import _value_table, affine_quantize_mxfp4
from test_kernels_affine import BITS, DTYPES, GROUPS, group_has_tie_or_is_negative, load, matrices, mlx_cpu_quantize
from test_scale_table_driven import _mxfp4_rows

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not installed")
BACKENDS = ("cpu", "metal")
ALL_DTYPES = tuple(np.dtype(t) for t in DTYPES.values())


def same(a: tuple, b: tuple) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- dense affine

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_affine_equals_the_reference_on_the_golden_inputs(dtype: str) -> None:
    w = load(dtype)["w"]
    special = 0
    for bits in BITS:
        for gs in GROUPS:
            for backend in BACKENDS:
                assert same(fast_affine.affine_quantize(w, gs, bits, backend=backend),
                            kernels_ref.affine_quantize(w, gs, bits, backend=backend)), (bits, gs, backend)
            special += int(group_has_tie_or_is_negative(w, gs, bits).sum())
    assert special > 0  # the inputs do hold ties and all-negative groups


def test_affine_cpu_equals_live_mlx() -> None:
    for dtype in DTYPES:
        w = load(dtype)["w"]
        for bits in BITS:
            for gs in GROUPS:
                assert same(fast_affine.affine_quantize(w, gs, bits, backend="cpu"), mlx_cpu_quantize(w, gs, bits)), (dtype, bits, gs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(matrices())
def test_property_affine_equals_the_reference(case) -> None:
    w, gs, bits = case
    for backend in BACKENDS:
        assert same(fast_affine.affine_quantize(w, gs, bits, backend=backend), kernels_ref.affine_quantize(w, gs, bits, backend=backend))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference's NaN quotients near float32's limit
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
def test_affine_all_negative_zero_and_constant_groups(dtype: np.dtype) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((7, 256)).astype(np.float32)
    w[0] = -np.abs(w[0])  # all negative: the GPU's w_max = 0
    w[1] = 0.0
    w[2] = -0.0
    w[3] = 1.5
    w[4, ::2] = -2.0
    w[5] = np.float32(1e-30)  # range below eps
    w = w.astype(dtype)
    w[6] = np.float32(ml_dtypes.finfo(dtype).max) * np.float32(0.9)  # bfloat16/float32: q0 overflows, NaN quotients
    for bits in BITS:
        for gs in GROUPS:
            for backend in BACKENDS:
                assert same(fast_affine.affine_quantize(w, gs, bits, backend=backend),
                            kernels_ref.affine_quantize(w, gs, bits, backend=backend)), (bits, gs, backend)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_affine_refuses_non_finite_like_the_reference(dtype: np.dtype, bad: float) -> None:
    w = np.ones((3, 128), np.float32)
    w[2, 70] = bad
    w = w.astype(dtype)
    with pytest.raises(FmtconvError, match="inf/NaN") as ref:
        kernels_ref.affine_quantize(w, 64, 4, name="layers.0.w")
    with pytest.raises(FmtconvError, match="inf/NaN") as got:
        fast_affine.affine_quantize(w, 64, 4, name="layers.0.w")
    assert str(got.value) == str(ref.value)


def test_affine_refuses_bad_parameters_and_shapes() -> None:
    for kwargs in (dict(group_size=64, bits=7), dict(group_size=16, bits=4), dict(group_size=64, bits=4, backend="tpu")):
        with pytest.raises(FmtconvError):
            fast_affine.affine_quantize(np.zeros((2, 192), np.float32), **kwargs)
    with pytest.raises(FmtconvError, match="multiple of group_size"):
        fast_affine.affine_quantize(np.zeros((2, 100), np.float32), 64, 4)
    with pytest.raises(FmtconvError, match="float32, float16 or bfloat16"):
        fast_affine.affine_quantize(np.zeros((2, 64), np.float64), 64, 4)


def test_affine_keeps_leading_dimensions() -> None:
    w = np.random.default_rng(2).standard_normal((2, 3, 128)).astype(ml_dtypes.bfloat16)
    got = fast_affine.affine_quantize(w, 64, 3, backend="metal")
    assert same(got, kernels_ref.affine_quantize(w, 64, 3, backend="metal"))
    assert got[0].shape == (2, 3, 12) and got[1].shape == (2, 3, 2)


# ---------------------------------------------------------------- packing

@pytest.mark.parametrize("bits", BITS)
def test_packing_equals_the_reference(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for shape in ((3, 128), (2, 2, 32), (1, 4096)):
        codes = rng.integers(0, 1 << bits, shape, dtype=np.uint8)
        got = fast_packing.pack_codes(codes, bits)
        want = pack_codes(codes, bits)
        assert got.dtype == want.dtype == np.uint32 and got.shape == want.shape and got.tobytes() == want.tobytes()


# ---------------------------------------------------------------- MXFP4 -> affine

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # extreme scales overflow float32 ranges in the reference
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
def test_mxfp4_equals_the_table_reference(dtype: np.dtype) -> None:
    rng = np.random.default_rng(7)
    finite = _value_table(dtype.name)[1]
    compared = 0
    for backend in BACKENDS:
        for gs in GROUPS:
            for bits in BITS:
                packed, scales = _mxfp4_rows(rng, 16, 512)
                tamed = np.where(finite[scales], scales, np.uint8(120))  # every block on the table route (float16!)
                for s, rows in ((scales, slice(0, 8)), (scales, slice(8, 16)), (tamed, slice(0, 16))):
                    got = fast_mxfp4.affine_quantize_mxfp4(packed[rows], s[rows], gs, bits, dtype=dtype, backend=backend)
                    want = affine_quantize_mxfp4(packed[rows], s[rows], gs, bits, dtype=dtype, backend=backend)
                    assert (got is None) == (want is None), (backend, gs, bits)
                    if want is not None:
                        assert same(got, want), (backend, gs, bits)
                        compared += 1
    assert compared >= 2 * 3 * 6  # every case compared at least once


def test_mxfp4_checks_shapes() -> None:
    with pytest.raises(ValueError):
        fast_mxfp4.affine_quantize_mxfp4(np.zeros((2, 32), np.uint8), np.zeros((2, 1), np.uint8), 64, 4,
                                         dtype=ALL_DTYPES[0], backend="cpu")


# ---------------------------------------------------------------- FP8 -> affine

def _fp8_group(shape: tuple[int, ...], block: tuple[int, int], kind: str) -> SourceGroup:
    return SourceGroup("w.weight", "fp8_block", {"weight": "w.weight", "scale": "w.scale"}, shape,
                       {"layout": "deepseek_v4" if kind == "e8m0" else "deepseek_v3", "block": block, "scale_kind": kind})


def _fp8_reference(parts, group, rows, dtype, gs, bits, backend):
    """The pipeline's NumPy route: codec decode, rounding as mlx_lm (float scales) or once, kernels_ref.affine_quantize."""
    exact = get_codec("fp8_block").decode(parts, group, compute_dtype=dtype, rows=rows)
    v = exact.to(dtype, like_mlx_lm=exact.values.dtype == np.float64)
    return kernels_ref.affine_quantize(v, gs, bits, backend=backend)


def _few_bit_scales(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Scales with 1-4 significant bits: e4m3 x scale then has <= 8 bits or lands on bfloat16 ties often."""
    mant = rng.choice([1.0, 1.5, 1.25, 1.75, 1.125, 1.375, 1.625, 1.875], size=shape)
    return (mant * np.exp2(rng.integers(-14, -4, size=shape))).astype(np.float32).astype(dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # float16: large scales overflow it in the NumPy route
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("kind", ["e8m0", "float32", "bfloat16", "float16"])
def test_fp8_equals_the_numpy_route(dtype: np.dtype, kind: str) -> None:
    rng = np.random.default_rng(11)
    codec = get_codec("fp8_block")
    for shape, block in (((2, 300, 256), (128, 128)), ((384, 512), (128, 128)), ((96, 256), (32, 32)), ((64, 256), (64, 96))):
        *lead, out, k = shape
        codes = rng.integers(0, 256, shape, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x10
        codes.reshape(-1, k)[3, :64] |= 0x80  # an all-negative group
        sshape = (*lead, -(-out // block[0]), -(-k // block[1]))
        if kind == "e8m0":
            scale = rng.integers(100, 140, sshape, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu)
        else:
            scale = _few_bit_scales(rng, sshape, {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[kind])
        group = _fp8_group(shape, block, "e8m0" if kind == "e8m0" else "float")
        parts = {"weight": codes.view(ml_dtypes.float8_e4m3fn), "scale": scale}
        total = int(np.prod(shape[:-1]))
        for start, stop in ((0, total), (5, total - 7), (out - 1, min(total, out + 130))):
            f = codec.factored_rows(parts, group, rows=(start, stop))
            for gs in GROUPS:
                for bits in (4, 8, 3):
                    for backend in BACKENDS:
                        got = fast_fp8.affine_quantize_fp8(f.codes, f.scale, f.srows, f.block_cols, scale_kind=f.scale_kind,
                                                           group_size=gs, bits=bits, dtype=dtype, backend=backend)
                        try:
                            want = _fp8_reference(parts, group, (start, stop), dtype, gs, bits, backend)
                        except FmtconvError:  # float16: large scales overflow it
                            assert got is None
                            continue
                        assert got is not None and same(got, want), (shape, block, start, gs, bits, backend)


def test_fp8_float_products_hit_bfloat16_ties() -> None:
    """The tie case of the float32 -> bfloat16 rounding, on purpose: products exactly halfway, both parities."""
    k = 128
    e4m3 = kernels_ref.e4m3_decode(np.arange(256, dtype=np.uint8))
    codes = np.tile(np.arange(k, dtype=np.uint8), (4, 1))
    codes[(codes & 0x7F) == 0x7F] = 0
    scale = np.array([[1.0 + 2.0**-8], [1.0 + 3 * 2.0**-8], [-(1.0 + 2.0**-8)], [1.0 + 2.0**-9]], dtype=np.float32)
    p = e4m3[codes] * scale
    assert ((p.view(np.uint32) & 0xFFFF) == 0x8000).sum() > 20  # many exact ties
    group = _fp8_group((4, k), (1, k), "float")
    parts = {"weight": codes.view(ml_dtypes.float8_e4m3fn), "scale": scale}
    f = get_codec("fp8_block").factored_rows(parts, group)
    for dtype in ALL_DTYPES:
        for backend in BACKENDS:
            want = _fp8_reference(parts, group, None, dtype, 32, 8, backend)
            got = fast_fp8.affine_quantize_fp8(f.codes, f.scale, f.srows, f.block_cols, scale_kind="float", group_size=32,
                                               bits=8, dtype=dtype, backend=backend)
            assert same(got, want), (dtype, backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("kind", ["e8m0", "float"])
def test_fp8_non_finite_and_extreme_rows(kind: str) -> None:
    """Where the NumPy route refuses (NaN codes, non-finite scales, values that overflow the dtype) the kernel
    returns None, so that route runs and refuses; values near float32's limit it quantizes as the reference does."""
    codec = get_codec("fp8_block")
    shape, block = (128, 128), (128, 128)
    group = _fp8_group(shape, block, kind)
    codes = np.full(shape, 0x38, dtype=np.uint8)
    nan_codes = codes.copy()
    nan_codes[5, 7] = 0x7F
    if kind == "e8m0":
        e8 = lambda c: np.full((1, 1), c, np.uint8).view(ml_dtypes.float8_e8m0fnu)  # noqa: E731
        cases = [(nan_codes, e8(127)), (codes, e8(254)), (codes, e8(140))]
    else:
        f32 = lambda v: np.full((1, 1), v, np.float32)  # noqa: E731
        cases = [(nan_codes, f32(1.0)), (codes, f32(np.inf)), (codes, f32(np.nan)), (codes, f32(3e38)), (codes, f32(1e30))]
    refused = 0
    for c, s in cases:
        parts = {"weight": c.view(ml_dtypes.float8_e4m3fn), "scale": s}
        f = codec.factored_rows(parts, group)
        for dtype in ALL_DTYPES:
            for backend in BACKENDS:
                got = fast_fp8.affine_quantize_fp8(f.codes, f.scale, f.srows, f.block_cols, scale_kind=f.scale_kind,
                                                   group_size=64, bits=8, dtype=dtype, backend=backend)
                try:
                    want = _fp8_reference(parts, group, None, dtype, 64, 8, backend)
                except FmtconvError:
                    assert got is None
                    refused += 1
                    continue
                assert got is not None and same(got, want), (kind, dtype, backend)
    assert refused >= 8


# ---------------------------------------------------------------- the switch

def test_the_switch(monkeypatch) -> None:
    w = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    monkeypatch.setenv(kernels.KERNELS_ENV, "reference")
    assert not kernels.compiled()
    assert same(kernels.affine_quantize(w, 64, 4), kernels_ref.affine_quantize(w, 64, 4))
    assert kernels.affine_quantize_fp8(np.zeros((1, 64), np.uint8), np.ones((1, 1), np.float32), np.zeros(1, np.int64), 128,
                                       scale_kind="float", group_size=64, bits=4, dtype=np.dtype(np.float32), backend="cpu") is None
    monkeypatch.setenv(kernels.KERNELS_ENV, "fast")
    with pytest.raises(FmtconvError, match="FMTCONV_KERNELS"):
        kernels.compiled()
    monkeypatch.setenv(kernels.KERNELS_ENV, "compiled")
    assert kernels.compiled()
    kernels.warm_up()
    monkeypatch.setenv(kernels.KERNELS_ENV, "auto")
    try:
        kernels.auto_for(kernels.AUTO_MIN_PARAMS - 1)  # a small conversion: the references, numba not even started
        assert not kernels.compiled()
        kernels.auto_for(kernels.AUTO_MIN_PARAMS)
        assert kernels.compiled()
    finally:
        kernels.auto_for(kernels.AUTO_MIN_PARAMS)
