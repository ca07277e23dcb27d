"""MLX affine quantization, bit-exact: `affine_quantize` and `affine_dequantize`.

Mirrors (MLX 0.32.x):
  backend "cpu"   mlx/backend/cpu/quantized.cpp `quantize` (what `mx.quantize` runs on a CPU stream)
  backend "metal" mlx/backend/metal/kernels/quantized.h `affine_quantize` (what `mx.quantize`
                  runs on a Mac GPU, i.e. what `mlx_lm.convert` writes there); the CUDA kernel
                  mlx/backend/cuda/quantized/affine_quantize.cu `affine_quantize` has the same
                  arithmetic, so "cuda" is an alias.
Checked against the ml-explore/mlx sources and the Metal headers shipped in the installed
mlx 0.32.4 wheel (mlx/include/mlx/backend/metal/kernels/quantized.h): same arithmetic; 0.32.4
adds bits=1, which fmtconv does not support.  The CPU variant is verified live against mx.quantize.

Quantize, per group of `group_size` consecutive elements of a row, all in float32
(the input is widened from its dtype first, exactly):
  1. Range.  CPU: w_min/w_max start at +inf/-inf, so they are the true min and max.
     GPU: w_min starts at the dtype's max (CUDA: float's max) and w_max starts at 0, so
     w_max = max(0, true max): an all-negative group is quantized as if it also held a 0.
  2. n_bins = 2^bits - 1, eps = 1e-7 (float32).
     scale = max((w_max - w_min) / n_bins, eps).
  3. Side: the end with the larger magnitude becomes the `edge`
     (side = |w_min| > |w_max|; ties pick w_max).  The scale is made negative when the
     edge is w_max, so that codes still run 0..n_bins upwards from the edge.
  4. q0 = round(edge / scale); if q0 != 0: scale = edge / q0 and bias = edge, else the
     scale stays and bias = 0.  Rescaling puts the edge exactly on code 0 and makes
     bias - q0*scale = 0 land on a code, so 0.0 is representable exactly.
  5. code = clamp(round((w - bias) / scale), 0, n_bins), with the float32 scale and bias.
     CPU clamps below and above; the GPU kernels only clamp above (`min(..., n_bins)`),
     which is the same for finite input because (w - bias)/scale >= 0 by construction.
  6. The stored scale and bias are the float32 values cast once (round to nearest even)
     to the input dtype; the codes were computed from the float32 values, not the cast ones.
  Rounding: CPU `std::rint` = half to even; Metal/CUDA `round` = half away from zero.
  They differ on exact .5 quotients (frequent with bfloat16 inputs, whose 8-bit
  significands make (w - bias)/scale land on .5 often) and, through step 1, on
  all-negative groups.  Elsewhere the two backends give identical bytes.

Why not the "community" formula scale = (max - min)/(2^bits - 1), bias = min: it neither
puts 0.0 on the grid nor uses MLX's edge/q0 rescale, so its scales and biases differ from
MLX's in nearly every group.  Bundles built that way are not what `mx.quantize` writes, and
(reported on a 43-layer model) the per-group error piles up until activations overflow to
NaN around layer 29.

Division precision: MLX compiles its metallib with `-fno-fast-math`
(mlx/backend/metal/kernels/CMakeLists.txt).  The Metal Shading Language specification's
accuracy table for that mode lists float `x / y` (and `1.0 / x`) as correctly rounded
(fast-math mode only promises 2.5 ulp), so Metal's `edge / scale`, `edge / q0` and
`(w - bias) / scale` are the same IEEE float32 results NumPy computes.  CUDA's `/` on float
is IEEE-correct by default (-prec-div=true).

inf/NaN: MLX does not check.  A NaN in a group makes min/max and every code of the group
depend on comparison order (std::max/min vs Metal fmin/fmax), an inf makes the scale inf
and the codes NaN cast to an integer (undefined behaviour in C++).  fmtconv refuses such
input (FmtconvError) instead of writing bytes that differ between machines.

Dequantize: code * scale + bias in the scales' dtype T.
  CPU (mlx/ops.cpp `affine_dequantize` fallback, used on CPU streams): `multiply` then `add`,
  two array ops, so T(T(q * scale) + bias): two roundings.
  GPU (quantized.h `affine_dequantize`, cuda affine_quantize.cu `affine_dequantize`): the single
  expression `scale * d + bias` in T; GPU compilers contract it into one fused multiply-add
  (one rounding).  This variant cannot be run here (no Mac); it is modelled, not verified.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_dtypes
import numpy as np

from fmtconv.errors import FmtconvError

from .packing import SUPPORTED_BITS, pack_codes, unpack_codes
from .rounding import round_half_away

SUPPORTED_GROUP_SIZES = (32, 64, 128)
BACKENDS = {"cpu": "cpu", "metal": "metal", "cuda": "metal"}
_EPS = np.float32(1e-7)  # quantized.cpp quantize / quantized.h affine_quantize: eps = 1e-7
_CHUNK = 1 << 17  # elements per vectorised step (measured best: temporaries stay in L2)
_BELOW_HALF = np.float32(0.5) - np.float32(2.0**-25)  # largest float32 below 0.5


def _check_dtype(dtype: np.dtype, what: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise FmtconvError(f"{what} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def _check_params(group_size: int, bits: int, backend: str) -> str:
    if bits not in SUPPORTED_BITS:
        raise FmtconvError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise FmtconvError(f"group_size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size}")
    if backend not in BACKENDS:
        raise FmtconvError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return BACKENDS[backend]


def to_float32(x: np.ndarray) -> np.ndarray:
    """Widen float16/bfloat16/float32 to float32 exactly (bfloat16 by a 16-bit shift, fast)."""
    if x.dtype == ml_dtypes.bfloat16:
        return (x.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    return x.astype(np.float32)


def _params(w_min: np.ndarray, w_max: np.ndarray, bits: int, half_away: bool):
    """float32 scale and bias per group from the group's range (steps 2-4 of the docstring)."""
    n_bins = np.float32((1 << bits) - 1)
    scale = np.maximum((w_max - w_min) / n_bins, _EPS)
    side = np.abs(w_min) > np.abs(w_max)
    scale = np.where(side, scale, -scale)
    edge = np.where(side, w_min, w_max)
    q0 = edge / scale
    q0 = round_half_away(q0) if half_away else np.rint(q0)
    nonzero = q0 != 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(nonzero, edge / q0, scale)
    bias = np.where(nonzero, edge, np.float32(0))
    return scale.astype(np.float32), bias.astype(np.float32)


def _round_half_away(y: np.ndarray) -> np.ndarray:
    """Metal/CUDA `round` for y > -0.5 (all the affine kernel produces), in place on float32.

    floor(y + 0.5) is exact here except for y = 0.5 - 2^-25, where y + 0.5 rounds (to even)
    up to 1.0: for y >= 0.5 the sum stays in y's binade or lands on a multiple of ulp(y), and
    below 0.25 it cannot reach 1.
    """
    bad = y == _BELOW_HALF
    y += np.float32(0.5)
    np.floor(y, out=y)
    if bad.any():
        y[bad] = 0
    return y


def _quantize_chunk(x: np.ndarray, bits: int, backend: str, name: str | None):
    """x: (groups, group_size) float32 -> (codes uint8, scale f32, bias f32)."""
    w_max = x.max(axis=1)
    w_min = x.min(axis=1)
    if not (np.isfinite(w_max).all() and np.isfinite(w_min).all()):
        raise FmtconvError("affine_quantize refuses inf/NaN input (MLX would write undefined codes)", tensor=name)
    metal = backend == "metal"
    if metal:
        np.maximum(w_max, 0, out=w_max)  # GPU: w_max starts at 0
    scale, bias = _params(w_min, w_max, bits, half_away=metal)
    y = quantize_step(x, scale[:, None], bias[:, None], bits, metal)
    return y.astype(np.uint8), scale, bias


def quantize_step(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, bits: int, half_away: bool,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Step 5 on float32 x: clamp(round((x - bias) / scale), 0, n_bins) as float32 (into `out`, which may be x),
    with Metal's (half_away) or the CPU's rounding."""
    y = np.subtract(x, bias, out=out)
    np.divide(y, scale, out=y)
    if half_away:
        _round_half_away(y)
    else:
        np.rint(y, out=y)
    return np.clip(y, 0, (1 << bits) - 1, out=y)


def affine_quantize(w: np.ndarray, group_size: int = 64, bits: int = 4, *, backend: str = "metal", name: str | None = None):
    """Quantize like `mx.quantize(w, group_size, bits)` -> (wq uint32, scales, biases).

    w: float32/float16/bfloat16, any leading dims, last dim divisible by group_size.
    backend: "metal" (= "cuda", the GPU kernels, default) or "cpu" (MLX's CPU backend).
    scales/biases come back in w's dtype with last dim in/group_size; wq has last dim in*bits/32.
    `name` only labels errors.
    """
    backend = _check_params(group_size, bits, backend)
    return quantize_in_chunks(w, group_size, bits, "affine_quantize input", name,
                              lambda x, dtype: _quantize_chunk(x, bits, backend, name))


ChunkQuantizer = Callable[[np.ndarray, np.dtype], tuple[np.ndarray, np.ndarray, np.ndarray]]


def quantize_in_chunks(w: np.ndarray, group_size: int, bits: int, what: str, name: str | None, chunk: ChunkQuantizer):
    """The group-wise driver shared by the encoders: w's groups as float32 in bounded chunks through
    chunk(x (g, group_size), dtype) -> (codes uint8, scales, biases float32), packed -> (wq, scales, biases)."""
    w = np.asarray(w)
    dtype = _check_dtype(w.dtype, what)
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % group_size:
        raise FmtconvError(f"last dimension of shape {w.shape} must be a positive multiple of group_size={group_size}", tensor=name)
    lead, k = w.shape[:-1], w.shape[-1]
    flat = np.ascontiguousarray(w).reshape(-1, group_size)
    n_groups = flat.shape[0]
    codes = np.empty((n_groups, group_size), dtype=np.uint8)
    scales = np.empty(n_groups, dtype=np.float32)
    biases = np.empty(n_groups, dtype=np.float32)
    step = max(1, _CHUNK // group_size)
    for g0 in range(0, n_groups, step):
        g1 = min(n_groups, g0 + step)
        codes[g0:g1], scales[g0:g1], biases[g0:g1] = chunk(to_float32(flat[g0:g1]), dtype)
    wq = pack_codes(codes.reshape(-1, k), bits).reshape(lead + (k * bits // 32,))
    sshape = lead + (k // group_size,)
    return wq, scales.astype(dtype).reshape(sshape), biases.astype(dtype).reshape(sshape)


def affine_dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int = 64, bits: int = 4, *, backend: str = "cpu", name: str | None = None) -> np.ndarray:
    """Dequantize like `mx.dequantize(wq, scales, biases, group_size, bits)`, in scales' dtype.

    backend "cpu": T(T(q * scale) + bias) (MLX's CPU path, verified live); "metal"/"cuda":
    one rounding of q * scale + bias (the GPU kernels' fused multiply-add, modelled).
    """
    backend = _check_params(group_size, bits, backend)
    scales, biases = np.asarray(scales), np.asarray(biases)
    dtype = _check_dtype(scales.dtype, "scales")
    if biases.dtype != dtype or biases.shape != scales.shape:
        raise FmtconvError(f"biases {biases.dtype}{biases.shape} must match scales {dtype}{scales.shape}", tensor=name)
    wq = np.asarray(wq)
    if wq.dtype != np.uint32 or wq.shape[:-1] != scales.shape[:-1] or wq.shape[-1] * 32 // bits != scales.shape[-1] * group_size:
        raise FmtconvError(
            f"wq {wq.dtype}{wq.shape} does not fit scales {scales.shape} with group_size={group_size}, bits={bits}", tensor=name
        )
    codes = unpack_codes(wq, bits).reshape(scales.shape + (group_size,)).astype(np.float32)
    out = dequantize_values(codes, to_float32(scales)[..., None], to_float32(biases)[..., None], dtype, backend)
    return out.reshape(scales.shape[:-1] + (scales.shape[-1] * group_size,))


def dequantize_values(codes: np.ndarray, s: np.ndarray, b: np.ndarray, dtype: np.dtype, backend: str) -> np.ndarray:
    """code * scale + bias in `dtype` with `backend`'s arithmetic (see affine_dequantize), broadcasting.

    codes, s, b: float32 (codes < 256, s and b holding dtype values); returns an array of `dtype`.
    """
    if BACKENDS[backend] == "cpu":
        # Each float32 op then cast equals the correctly rounded op in T (24 >= 2*11 + 2 bits).
        prod = (codes * s).astype(dtype)
        return (to_float32(prod) + b).astype(dtype)
    if dtype != np.float32:
        return _round_once_f32(codes * s, b, dtype)
    return _round_once(codes.astype(np.float64) * s.astype(np.float64), b.astype(np.float64), dtype)


def _round_once_f32(p: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`_round_once` for a 16-bit dtype in float32: p = code * scale is exact in float32 (8 + 11 bits); TwoSum gives
    p + b and its error, which rounds the sum to odd at 24 bits (a sticky last bit), so one rounding to dtype
    (<= 11 bits) then sees the true side of every tie."""
    with np.errstate(over="ignore", invalid="ignore"):
        s = p + b
        bb = s - p
        err = (p - (s - bb)) + (b - bb)
    even = (s.view(np.uint32) & np.uint32(1)) == 0
    fix = (err != 0) & even & np.isfinite(s)
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(err > 0, np.float32(np.inf), np.float32(-np.inf))), s)
    return s.astype(dtype)


def _round_once(p: np.ndarray, b: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round the exact p + b (p, b float64, p exact) once to `dtype`.

    TwoSum gives the float64 sum and its error; a nonzero error nudges the sum one float64
    ulp towards the true value (a sticky bit), so the later rounding to <= 24 bits,
    done via round-to-odd float32 for the 16-bit types, sees the true side of every tie.
    """
    s = p + b
    bb = s - p
    err = (p - (s - bb)) + (b - bb)
    s = np.where(err > 0, np.nextafter(s, np.inf), np.where(err < 0, np.nextafter(s, -np.inf), s))
    r = s.astype(np.float32)
    if dtype == np.float32:
        return r
    inexact = r.astype(np.float64) != s
    even = (r.view(np.uint32) & 1) == 0
    fix = inexact & even
    toward = np.where(s > r, np.float32(np.inf), np.float32(-np.inf))
    r = np.where(fix, np.nextafter(r, toward), r)
    return r.astype(dtype)
