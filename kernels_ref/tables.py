"""Element tables and scalar conversions for E2M1 (FP4), E4M3 (FP8) and E8M0 (scale) codes.

Every function is vectorised over NumPy arrays.  Where MLX deviates from the OCP
Microscaling (MX) v1.0 spec, the MLX behaviour is what fmtconv must reproduce
and the deviation is named in the docstring (``like_mlx`` flag).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

# OCP MX v1.0 sec. 5.3.3 / MLX mlx/backend/cpu/quantized.cpp FP4_LUT: code = sign(1)|exp(2)|mant(1).
E2M1_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
E2M1_MAX = 6.0  # MLX mlx/backend/metal/kernels/fp4.h F4E2M1_MAX
E4M3_MAX = 448.0  # MLX mlx/backend/metal/kernels/fp4.h F8E4M3_MAX

# Decision thresholds of MLX's E2M1 encoder (metal/kernels/fp4.h fp4_e2m1::fp4_e2m1,
# cpu/quantized.cpp to_fp4_e2m1): |x| > t picks the next code for the "strict" midpoints
# (ties go down to the even code) and |x| >= t for the others (ties go up to the even code).
# Net effect: round to nearest, ties to even mantissa, saturating at 6.
_E2M1_MIDPOINTS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=np.float32)


def e2m1_decode(codes: np.ndarray) -> np.ndarray:
    """FP4 codes (low 4 bits of each uint8) -> float32 values (OCP MX E2M1 table)."""
    return E2M1_VALUES[np.asarray(codes, dtype=np.uint8) & 0x0F]


def e2m1_encode(x: np.ndarray) -> np.ndarray:
    """float -> FP4 codes, as MLX's GPU kernels do (metal/kernels/fp4.h fp4_e2m1, cpu to_fp4_e2m1).

    Round to nearest with ties to the even code, saturate to +-6, keep the sign of
    zero (-0.1 -> 0x8), NaN -> 0x7.  (MLX's CPU `mx.quantize` fallback in mlx/ops.cpp
    fp_quantize instead takes the argmin over the table; see fp.py.)
    """
    x = np.asarray(x, dtype=np.float32)
    a = np.abs(x)
    # Codes 1..7 switch at the midpoints; ties go to the even code (0,2,4,6 are even mantissas).
    # A tie at midpoint k (between codes k and k+1) rounds up exactly when k+1 is even.
    code = np.zeros(a.shape, dtype=np.uint8)
    for k, m in enumerate(_E2M1_MIDPOINTS):
        code += (a >= m) if (k + 1) % 2 == 0 else (a > m)
    code |= np.signbit(x).astype(np.uint8) << 3
    code[np.isnan(x)] = 0x7
    return code


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """uint8 bytes (..., n) -> FP4 codes (..., 2n); the low nibble holds the even (first) element.

    Source: MLX metal/kernels/fp_quantized.h fp_quantize (`output |= next << 4` at even index)
    and mlx/ops.cpp fp_dequantize (idx_lo then idx_hi); OCP MX packs likewise.
    """
    p = np.asarray(packed).view(np.uint8)
    out = np.empty(p.shape[:-1] + (p.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = p & 0x0F
    out[..., 1::2] = p >> 4
    return out


def pack_fp4(codes: np.ndarray) -> np.ndarray:
    """FP4 codes (..., 2n) -> uint8 bytes (..., n), the even element in the low nibble."""
    c = np.asarray(codes, dtype=np.uint8)
    if c.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got shape {c.shape}")
    return ((c[..., 0::2] & 0x0F) | ((c[..., 1::2] & 0x0F) << 4)).astype(np.uint8)


def e4m3_decode(codes: np.ndarray) -> np.ndarray:
    """E4M3 (fn: finite, no inf) codes -> float32; 0x7F/0xFF are NaN (OCP MX / ml_dtypes float8_e4m3fn).

    MLX 0.32.4 agrees on CPU and Metal (cpu/unary_ops.h FromFP8, metal/kernels/fp8.h fp8_e4m3
    set the half exponent to all-ones for 0x7F); older MLX Metal read 0x7F as 480.
    """
    return np.asarray(codes, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e4m3_encode(x: np.ndarray) -> np.ndarray:
    """float -> E4M3 codes as MLX's ToFP8 (cpu/unary_ops.h ToFP8, metal/kernels/fp8.h fp8_e4m3).

    Round to nearest even (ml_dtypes float8_e4m3fn does this exactly) but saturating:
    |x| >= 448, +-inf and NaN all become 0x7E with the sign bit of x.
    """
    x = np.asarray(x, dtype=np.float32)
    sign = np.signbit(x).astype(np.uint8) << 7
    big = ~(np.abs(x) < E4M3_MAX)  # also true for NaN
    safe = np.where(big, np.float32(0), x)
    out = safe.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    out = np.where(big, np.uint8(0x7E) | sign, out | sign)
    return out.astype(np.uint8)


def e8m0_decode(codes: np.ndarray, *, like_mlx: bool = False) -> np.ndarray:
    """E8M0 scale codes -> float32 2^(code-127); code 255 is NaN (OCP MX v1.0 sec. 5.4.1).

    Code 0 is 2^-127, a float32 subnormal.  like_mlx=True: MLX's fp8_e8m0 -> float
    (metal/kernels/fp8.h) and the CPU fallback (2^(code-127)) give +inf for code 255.
    """
    c = np.asarray(codes, dtype=np.uint8)
    bits = c.astype(np.uint32) << 23
    bits = np.where(c == 0, np.uint32(0x400000), bits)
    out = bits.view(np.float32)
    if not like_mlx:
        out = np.where(c == 255, np.float32(np.nan), out)
    return out.astype(np.float32)


# Exponent decisions (E8M0 scales) are made on the float's own exponent and significand
# (np.frexp is exact for every finite float32/float64), never through a float log2, whose last
# bit depends on the platform's libm / SIMD build (NumPy 2.4.6: log2(float32(1.4142135)) == 0.5).
_SQRT_HALF = 0.7071067811865476  # the float64 nearest sqrt(1/2); it lies above it (tested with Fractions)


def floor_log2(x: np.ndarray) -> np.ndarray:
    """Exact largest integer k with 2^k <= x, for finite x > 0 (float32 or float64)."""
    _, e = np.frexp(np.asarray(x))
    return (e - 1).astype(np.int32)


def ceil_log2(x: np.ndarray) -> np.ndarray:
    """Exact smallest integer k with 2^k >= x, for finite x > 0 (float32 or float64)."""
    m, e = np.frexp(np.asarray(x))
    return np.where(m == 0.5, e - 1, e).astype(np.int32)


def round_log2(x: np.ndarray) -> np.ndarray:
    """Exact nearest integer to log2(x), for finite x > 0.  Never a tie: 2^(k+1/2) is irrational.

    With x = m 2^e, m in [1/2, 1): log2(x) rounds up to e exactly when m > sqrt(1/2).
    """
    m, e = np.frexp(np.asarray(x))
    up = m.astype(np.float64) >= _SQRT_HALF  # in float64: m == _SQRT_HALF is above sqrt(1/2) too
    return np.where(up, e, e - 1).astype(np.int32)


def ceil_log2_ratio(num: np.ndarray, den: float) -> np.ndarray:
    """Exact smallest integer k with den * 2^k >= num (num, den > 0): ceil(log2(num/den)) without dividing."""
    num = np.asarray(num, dtype=np.float64)
    k = ceil_log2(num) - floor_log2(np.float64(den)) - 1  # num/den lies in (2^(k-1), 2^(k+1)]
    return (k + (np.ldexp(np.float64(den), k) < num)).astype(np.int32)


def e8m0_encode(x: np.ndarray, *, rounding: str = "up") -> np.ndarray:
    """Positive float scale -> E8M0 code as MLX's GPU kernels compute it, decided exactly.

    rounding="up" (MLX 0.32.4 metal/kernels/fp8.h mx_scale_round_up, used by fp_quantize; CUDA
    rounds up the same way): the smallest 2^k >= x, k clamped to [-127, 127]; zero -> 0.  Metal
    gets there as round(log2(x)) plus one step when the result decodes below x; an error of
    metal::log2 would have to reach 0.5 to change that, so no input depends on the platform's
    libm (tested against live MLX at powers of two and at sqrt(2) 2^k, where it is tightest).
    rounding="nearest" (metal/kernels/fp8.h fp8_e8m0 constructor alone, clamp(round(log2(x)),
    -127, 127)): here the exactly nearest exponent.  Metal's log2 is not correctly rounded, so on a
    Mac floats within a few ulp of sqrt(2) 2^k may round the other way; no MLX 0.32.4 quantizer
    uses this rounding (only the round-up above), and fmtconv's conversions never do.
    Both: non-finite -> 255, negative -> 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if rounding not in ("up", "nearest"):
        raise ValueError(f"rounding must be 'up' or 'nearest', got {rounding!r}")
    pos = np.isfinite(x) & (x > 0)
    safe = np.where(pos, x, np.float32(1))
    n = ceil_log2(safe) if rounding == "up" else round_log2(safe)
    n = np.where(pos, np.clip(n, -127, 127), -127)
    out = (n + 127).astype(np.uint8)
    out = np.where(~np.isfinite(x), np.uint8(255), out)
    return out.astype(np.uint8)
