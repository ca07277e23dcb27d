"""The per-group arithmetic of MLX's affine quantize kernel, as numba scalar and loop functions.

Each function is the compiled form of one step of kernels_ref/affine.py (its docstring holds the
why and the MLX sources); the byte-identity tests in tests/test_kernels_compiled.py hold the two
together.  Everything stays float32 (every constant is np.float32, so nothing widens to float64).

A group's range (step 1) is found on integer keys of the float bit patterns (`key = b ^ 0x8000...`
for positive, `~b` for negative floats orders them as the floats), so the min/max loop vectorizes and
the same two keys tell whether the group holds an inf or NaN.  Zero signs cannot change a result
(kernels_ref/table_driven.py docstring), so the keys' -0 < +0 is harmless.
"""

from __future__ import annotations

import numpy as np

from ._jit import inline

EPS = np.float32(1e-7)  # kernels_ref/affine.py _EPS
HALF = np.float32(0.5)
ONE = np.float32(1.0)
ZERO = np.float32(0.0)
BELOW_HALF = np.float32(0.5) - np.float32(2.0**-25)  # kernels_ref/affine.py _BELOW_HALF


@inline
def round_half_away(x: np.float32) -> np.float32:
    """Metal/CUDA `round` (kernels_ref/rounding.py round_half_away): ties away from zero, any x, exact."""
    t = np.trunc(x)
    away = t + np.copysign(ONE, x)
    near = np.rint(x)
    return away if np.abs(x - t) == HALF else near


@inline
def group_params(w_min: np.float32, w_max: np.float32, n_bins: np.float32, metal: bool) -> tuple[np.float32, np.float32]:
    """float32 (scale, bias) of one group from its range: kernels_ref/affine.py `_params` (steps 2-4).

    The caller has applied step 1 (for metal, w_max = max(w_max, 0))."""
    scale = max((w_max - w_min) / n_bins, EPS)
    side = np.abs(w_min) > np.abs(w_max)
    if not side:
        scale = -scale
    edge = w_min if side else w_max
    q0 = edge / scale
    q0 = round_half_away(q0) if metal else np.rint(q0)
    if q0 != ZERO:
        return edge / q0, edge
    return scale, ZERO


@inline
def codes_of(vals: np.ndarray, n: int, bias: np.float32, scale: np.float32, n_bins: np.float32, metal: bool,
             codes: np.ndarray) -> None:
    """Step 5 over vals[:n] into codes[:n]: clamp(round((v - bias) / scale), 0, n_bins).

    metal rounds as kernels_ref/affine.py `_round_half_away` (floor(y + 0.5), exact for the y > -0.5
    this step produces, but for y = 0.5 - 2^-25); branch-free, so LLVM vectorizes the division.
    A NaN quotient (finite values near float32's limit overflow q0 to inf, and the scale to -0) gives
    code 0, which is what NumPy's uint8 cast of NaN gives the reference on x86-64 and arm64.
    """
    if metal:
        for j in range(n):
            y = (vals[j] - bias) / scale
            r = np.floor(y + HALF)
            r = ZERO if y == BELOW_HALF else r
            codes[j] = np.uint8(min(r, n_bins) if r >= ZERO else ZERO)
    else:
        for j in range(n):
            y = np.rint((vals[j] - bias) / scale)
            codes[j] = np.uint8(min(y, n_bins) if y >= ZERO else ZERO)


@inline
def key32(b: np.int64) -> np.int64:
    """Order key of a float32 bit pattern (as int64 in [0, 2^32))."""
    return b ^ ((-(b >> 31) & 0x7FFFFFFF) | 0x80000000)


@inline
def range32(ubits: np.ndarray, n: int) -> tuple[np.int64, np.int64]:
    """(min key, max key) over the float32 bit patterns ubits[:n] (uint32)."""
    lo = np.int64(0xFFFFFFFF)
    hi = np.int64(0)
    for j in range(n):
        k = key32(np.int64(ubits[j]))
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi


@inline
def key16(b: np.int64) -> np.int64:
    """Order key of a bfloat16 bit pattern (as int64 in [0, 2^16))."""
    return b ^ ((-(b >> 15) & 0x7FFF) | 0x8000)


@inline
def range16(hbits: np.ndarray, n: int) -> tuple[np.int64, np.int64]:
    """(min key, max key) over the bfloat16 bit patterns hbits[:n] (uint16)."""
    lo = np.int64(0xFFFF)
    hi = np.int64(0)
    for j in range(n):
        k = key16(np.int64(hbits[j]))
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi


@inline
def finite32(lo: np.int64, hi: np.int64) -> bool:
    """Whether every float32 between these keys is finite: above -inf's key, below +inf's key."""
    return lo > 0x007FFFFF and hi < 0xFF800000


@inline
def finite16(lo: np.int64, hi: np.int64) -> bool:
    """Whether every bfloat16 between these keys is finite."""
    return lo > 0x007F and hi < 0xFF80


@inline
def value32(k: np.int64, cvt: np.ndarray) -> np.float32:
    """The float32 a key32 stands for; cvt is a 1-element uint32 scratch array (numba has no scalar bit cast)."""
    cvt[0] = np.uint32(k ^ 0x80000000 if k >= 0x80000000 else ~k & 0xFFFFFFFF)
    return cvt.view(np.float32)[0]


@inline
def value16(k: np.int64, cvt: np.ndarray) -> np.float32:
    """The float32 value of the bfloat16 a key16 stands for."""
    b = k ^ 0x8000 if k >= 0x8000 else ~k & 0xFFFF
    cvt[0] = np.uint32(b << 16)
    return cvt.view(np.float32)[0]


@inline
def quantize_range(vals: np.ndarray, n: int, w_min: np.float32, w_max: np.float32, bits: int, metal: bool,
                   codes: np.ndarray) -> tuple[np.float32, np.float32]:
    """Steps 1-5 on vals[:n] (float32, finite) whose true min and max are w_min, w_max: codes[:n], (scale, bias)."""
    n_bins = np.float32((1 << bits) - 1)
    if metal and w_max < ZERO:  # the GPU's w_max starts at 0
        w_max = ZERO
    scale, bias = group_params(w_min, w_max, n_bins, metal)
    codes_of(vals, n, bias, scale, n_bins, metal, codes)
    return scale, bias


@inline
def quantize_group(vals: np.ndarray, n: int, bits: int, metal: bool, codes: np.ndarray,
                   cvt: np.ndarray) -> tuple[np.float32, np.float32, bool]:
    """Steps 1-5 on vals[:n] (float32): codes[:n], and (scale, bias, finite).

    finite is False when a value is inf or NaN (kernels_ref refuses such groups); codes are then unset.
    """
    lo, hi = range32(vals.view(np.uint32), n)
    if not finite32(lo, hi):
        return ONE, ZERO, False
    scale, bias = quantize_range(vals, n, value32(lo, cvt), value32(hi, cvt), bits, metal, codes)
    return scale, bias, True


@inline
def quantize_bf16(hbits: np.ndarray, n: int, bits: int, metal: bool, ubuf: np.ndarray, codes: np.ndarray,
                  cvt: np.ndarray) -> tuple[np.float32, np.float32, bool]:
    """quantize_group for values given as bfloat16 bit patterns hbits[:n] (uint16): the range from their 16-bit keys,
    the values widened into ubuf (uint32 scratch, n long) by a shift."""
    lo, hi = range16(hbits, n)
    if not finite16(lo, hi):
        return ONE, ZERO, False
    for j in range(n):
        ubuf[j] = np.uint32(hbits[j]) << 16
    scale, bias = quantize_range(ubuf.view(np.float32), n, value16(lo, cvt), value16(hi, cvt), bits, metal, codes)
    return scale, bias, True
