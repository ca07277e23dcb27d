"""Rounding exact values to a model's compute dtype: once (fmtconv's default) or as mlx_lm does.

`round_to_dtype` rounds float32/float64 values ONCE, to nearest with ties to even, to
bfloat16, float16 or float32.  float64 sources take a round-to-odd float32 step first, then
one float32 -> target cast (IEEE round-to-nearest-even in NumPy and ml_dtypes alike).  This
does not depend on how a library casts float64 directly: ml_dtypes before 0.7 went through
float32 and rounded twice (1 + 2^-8 + 2^-30 became 1.0 instead of 1 + 2^-7), 0.7 rounds once;
tests/test_formats_dense.py checks the result against exact rationals under both behaviours.
Round-to-odd to 24 bits keeps every tie decision of a later rounding to <= 22 bits intact
(Boldo & Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using
rounding to odd", IEEE TC 2008), and bfloat16 has 8.

`round_like_mlx_lm` is the mlx_lm-compatible path: mlx_lm's `sanitize()` dequantizes FP8
by multiplying in float32 (`mx.from_fp8(...) * scale_inv`, float32 promotion) and casting
the product to bfloat16 (mlx_lm/models/deepseek_v3.py `Model.sanitize` `dequant`), and
`mlx_lm.convert` then casts to the model dtype (convert.py `set_dtype`): the exact product
to float32, to bfloat16, then to the target dtype.
Which route uses which is the converter's choice; the codecs' `Exact.to()` uses the single
rounding, `Exact.to(dtype, like_mlx_lm=True)` the compatible one.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
COMPUTE_DTYPES = (BFLOAT16, np.dtype(np.float16), np.dtype(np.float32))


def _check_target(dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype must be bfloat16, float16 or float32, got {dtype}")
    return dtype


def to_float32_odd(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounded to odd: inexact results get an odd last significand bit.

    A later round-to-nearest to <= 22 significant bits (bfloat16, float16, E4M3, E2M1) then
    equals rounding the float64 value directly.
    """
    x = np.asarray(x, dtype=np.float64)
    r = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        inexact = np.isfinite(x) & (r.astype(np.float64) != x)
    even = (r.view(np.uint32) & 1) == 0
    fix = inexact & even
    if fix.any():
        toward = np.where(x > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
        r = np.where(fix, np.nextafter(r, toward), r).astype(np.float32)
    return r


def round_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float32/float64 `values` once, to nearest-even, to bfloat16/float16/float32."""
    dtype = _check_target(dtype)
    v = np.asarray(values)
    if v.dtype == dtype:
        return v
    if v.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        v = v.astype(np.float64)  # bf16/f16 inputs widen exactly
    if dtype != np.float32 and v.dtype == np.float64:
        v = to_float32_odd(v)
    return v.astype(dtype)


def round_like_mlx_lm(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """mlx_lm-compatible: the exact values to float32, then to bfloat16, then to `dtype`."""
    dtype = _check_target(dtype)
    return np.asarray(values).astype(np.float32).astype(BFLOAT16).astype(dtype)
