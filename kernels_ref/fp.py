"""MLX's microscaling modes, bit-exact: `fp_quantize` / `fp_dequantize` for mxfp4, mxfp8, nvfp4.

Modes (mlx/ops.cpp `fp_quantize`): mxfp4 = E2M1 codes, group 32, E8M0 scales; mxfp8 = E4M3
codes, group 32, E8M0 scales; nvfp4 = E2M1 codes, group 16, E4M3 scales, with an optional
float32 `global_scale` (scale_enc = 448*6 / global_scale multiplies the scales before
encoding and divides back out on dequantize).  FP4 codes pack two per byte, low nibble first,
eight per little-endian uint32; FP8 codes four per uint32.  Scales are uint8 codes.

backend "metal" (default; "cuda" alias) mirrors the kernels metal/kernels/fp_quantized.h
`fp_quantize` / `fp_dequantize` (CUDA fp_quantize.cu follows them), all float32:
  amax/6 (or /448) [* scale_enc] -> E8M0 rounded up to the next power of two (MLX 0.32.4
  fp8.h mx_scale_round_up, tables.e8m0_encode) or E4M3 (saturating RNE), then code = encode(w * (scale_enc / decoded_scale)), E2M1 by RNE
  (tables.e2m1_encode).  Dequantize: T(decoded_scale [* global/2688] * value) in float32.
backend "cpu" mirrors what `mx.quantize` runs on a CPU stream: the `fallback` lambdas of
mlx/ops.cpp `fp_quantize` / `fp_dequantize`, plain array ops in the input dtype T:
  scales = T(amax / maxval); mx: k = ceil(log2(scales)) exactly (0 for a zero scale; checked
  against MLX 0.32.4, whose CPU rounds up like its GPU), w / T(2^k), E8M0 code = uint8(k + 127),
  wrapping outside 0..255 (no clamp); nv: scales * scale_enc in
  float32 -> E4M3, w / T(e4m3) in T, then * scale_enc in float32.  FP4 code = argmin over the
  16-entry table of |x - v| rounded to x's dtype (first index wins ties: ties go to the smaller
  magnitude and -0.1 gives +0); FP8 = saturating RNE.  Dequantize: table value times
  2^(code-127) computed in T (float16 over/underflows), or times the E4M3 scale in T.
The two backends differ on exact E2M1 ties and tiny negative values (-0 vs +0 codes).
Version note: MLX before 0.32.4 (e.g. the mirrored 0.32.2 sources) rounded E8M0 scales to the
nearest power of two (round(log2)); 0.32.4 rounds up on GPU and CPU alike, which is reproduced here.
"""

from __future__ import annotations

import numpy as np

from fmtconv.errors import FmtconvError

from .affine import BACKENDS, _check_dtype, to_float32
from .tables import ceil_log2, E2M1_MAX, E2M1_VALUES, E4M3_MAX, e2m1_encode, e4m3_decode, e4m3_encode, e8m0_decode, e8m0_encode, pack_fp4, unpack_fp4

# mode -> (group_size, bits); mlx/ops.cpp fp_quantize expected_gs / expected_bits
FP_MODES = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}


def _mode(mode: str, backend: str) -> tuple[int, int, str]:
    if mode not in FP_MODES:
        raise FmtconvError(f"mode must be one of {sorted(FP_MODES)}, got {mode!r}")
    if backend not in BACKENDS:
        raise FmtconvError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    return (*FP_MODES[mode], BACKENDS[backend])


def _in(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round float32 results to dtype and widen back: one op of MLX done in dtype."""
    return to_float32(np.asarray(x, dtype=np.float32).astype(dtype))


def _argmin_e2m1(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """mlx/ops.cpp fp_quantize fallback: argmin(|x - lut|) with the difference rounded to dtype."""
    out = np.empty(x.shape, dtype=np.uint8)
    flat, res = x.reshape(-1), out.reshape(-1)
    for i in range(0, flat.size, 1 << 16):
        d = np.abs(_in(flat[i : i + (1 << 16), None] - E2M1_VALUES[None, :], dtype))
        res[i : i + (1 << 16)] = np.argmin(d, axis=-1)  # NaN rows: argmin gives the first NaN
    return out


def fp_quantize(w: np.ndarray, mode: str = "mxfp4", *, global_scale: float | None = None, backend: str = "metal", name: str | None = None):
    """Quantize like `mx.quantize(w, mode=mode)` -> (wq uint32, scales uint8)."""
    group_size, bits, backend = _mode(mode, backend)
    w = np.asarray(w)
    dtype = _check_dtype(w.dtype, "fp_quantize input")
    if global_scale is not None and mode != "nvfp4":
        raise FmtconvError("global_scale is only used by nvfp4", tensor=name)
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % group_size:
        raise FmtconvError(f"last dimension of shape {w.shape} must be a multiple of {group_size} for {mode}", tensor=name)
    x = to_float32(np.ascontiguousarray(w)).reshape(-1, group_size)
    if not np.isfinite(x).all():
        raise FmtconvError(f"fp_quantize refuses inf/NaN input ({mode})", tensor=name)
    maxval = np.float32(E2M1_MAX if bits == 4 else E4M3_MAX)
    amax = np.abs(x).max(axis=-1, keepdims=True)
    enc = np.float32(1.0) if global_scale is None else np.float32(E4M3_MAX * E2M1_MAX) / np.float32(global_scale)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if backend == "metal":
            s = amax / maxval
            if global_scale is not None:
                s = s * enc
            if group_size == 32:
                scodes = e8m0_encode(s)
                sdec = e8m0_decode(scodes, like_mlx=True)
            else:
                scodes = e4m3_encode(s)
                sdec = e4m3_decode(scodes)
            mult = np.where(sdec == 0, np.float32(0), enc / sdec).astype(np.float32)
            y = x * mult
            codes = e4m3_encode(y) if bits == 8 else e2m1_encode(y)
        else:
            s = _in(amax / maxval, dtype)
            if group_size == 32:
                k = np.where(s == 0, 0, ceil_log2(np.where(s == 0, np.float32(1), s)))
                y = _in(x / _in(np.ldexp(np.float32(1), k), dtype), dtype)
                scodes = ((k.astype(np.int64) + 127) & 0xFF).astype(np.uint8)
            else:
                s = (s * enc).astype(np.float32)
                scodes = e4m3_encode(s)
                y = _in(x / to_float32(e4m3_decode(scodes).astype(dtype)), dtype) * enc
            if bits == 8:
                codes = e4m3_encode(y)
            else:
                codes = _argmin_e2m1(y, np.float32 if group_size == 16 else dtype)
    lead, k_in = w.shape[:-1], w.shape[-1]
    codes = codes.reshape(lead + (k_in,))
    packed = pack_fp4(codes) if bits == 4 else codes
    wq = np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)
    return wq, scodes.reshape(lead + (k_in // group_size,)).astype(np.uint8)


def fp_dequantize(wq: np.ndarray, scales: np.ndarray, mode: str = "mxfp4", *, dtype=np.float32, global_scale: float | None = None, backend: str = "cpu", name: str | None = None) -> np.ndarray:
    """Dequantize like `mx.dequantize(wq, scales, mode=mode, dtype=dtype)`."""
    group_size, bits, backend = _mode(mode, backend)
    dtype = _check_dtype(dtype, "fp_dequantize dtype")
    wq, scales = np.asarray(wq), np.asarray(scales)
    if wq.dtype != np.uint32 or scales.dtype != np.uint8 or wq.shape[:-1] != scales.shape[:-1] or wq.shape[-1] * 32 // bits != scales.shape[-1] * group_size:
        raise FmtconvError(f"wq {wq.dtype}{wq.shape} / scales {scales.dtype}{scales.shape} do not fit {mode}", tensor=name)
    b = np.ascontiguousarray(wq).astype("<u4", copy=False).view(np.uint8)
    out_shape = scales.shape[:-1] + (scales.shape[-1] * group_size,)
    if bits == 4:
        vals = E2M1_VALUES[unpack_fp4(b)]
    else:
        vals = e4m3_decode(b)
    vals = vals.reshape(scales.shape + (group_size,))
    with np.errstate(over="ignore", under="ignore"):
        if backend == "metal":
            if group_size == 32:
                sc = e8m0_decode(scales, like_mlx=True)
            else:
                sc = e4m3_decode(scales)
                if global_scale is not None:
                    sc = sc * (np.float32(global_scale) / np.float32(E4M3_MAX * E2M1_MAX))
            return (sc[..., None] * vals).astype(dtype).reshape(out_shape)
        vals = _in(vals, dtype)
        if group_size == 32:
            sc = _in(np.power(np.float32(2), scales.astype(np.float32) - np.float32(127)), dtype)
        else:
            sc = _in(e4m3_decode(scales), dtype)
            if global_scale is not None:
                # float32 global / T(2688) promotes to float32, and so does the product.
                sc = sc * (np.float32(global_scale) / np.float32(E4M3_MAX * E2M1_MAX))
                return (sc[..., None] * vals).astype(np.float32).reshape(out_shape)
        return (sc[..., None] * vals).astype(dtype).reshape(out_shape)
