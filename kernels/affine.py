"""Dense rows -> MLX affine, compiled: the same bytes as kernels_ref.affine_quantize.

Inputs are bfloat16 (widened by a 16-bit shift), float16 (widened through a 65536-entry table that
NumPy fills, exactly) or float32.  Each row group is widened into a scratch buffer, quantized by
affine_math.quantize_group and packed straight into the output words; scales and biases come back
as float32 and are cast to the input dtype by NumPy, as the reference does (one cast, nearest-even).
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.kernels_ref.affine import _check_dtype, _check_params

from ._jit import jit, readonly
from .affine_math import quantize_bf16, quantize_group
from .packing import pack_group

_NONFINITE = "affine_quantize refuses inf/NaN input (MLX would write undefined codes)"  # kernels_ref's message
BF16 = np.dtype(ml_dtypes.bfloat16)


@functools.lru_cache(maxsize=None)
def f16_widening_table() -> np.ndarray:
    """float32[65536]: the value of every float16 bit pattern (NumPy's exact widening)."""
    return np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)


@jit
def _rows_bf16(x, group_size, bits, metal, wq, scales, biases):
    n, k = x.shape
    ubuf = np.empty(group_size, dtype=np.uint32)
    codes = np.empty(group_size, dtype=np.uint8)
    cvt = np.empty(1, dtype=np.uint32)
    bpg = group_size * bits // 8
    wq8 = wq.view(np.uint8)
    for r in range(n):
        for g in range(k // group_size):
            s, b, ok = quantize_bf16(x[r, g * group_size : (g + 1) * group_size], group_size, bits, metal, ubuf, codes, cvt)
            if not ok:
                return r
            scales[r, g] = s
            biases[r, g] = b
            pack_group(codes, group_size, bits, wq8[r], g * bpg)
    return -1


@jit
def _rows_table(x, table, group_size, bits, metal, wq, scales, biases):
    n, k = x.shape
    vals = np.empty(group_size, dtype=np.float32)
    codes = np.empty(group_size, dtype=np.uint8)
    cvt = np.empty(1, dtype=np.uint32)
    bpg = group_size * bits // 8
    wq8 = wq.view(np.uint8)
    for r in range(n):
        for g in range(k // group_size):
            c0 = g * group_size
            for j in range(group_size):
                vals[j] = table[x[r, c0 + j]]
            s, b, ok = quantize_group(vals, group_size, bits, metal, codes, cvt)
            if not ok:
                return r
            scales[r, g] = s
            biases[r, g] = b
            pack_group(codes, group_size, bits, wq8[r], g * bpg)
    return -1


@jit
def _rows_f32(x, group_size, bits, metal, wq, scales, biases):
    n, k = x.shape
    vals = np.empty(group_size, dtype=np.float32)
    codes = np.empty(group_size, dtype=np.uint8)
    cvt = np.empty(1, dtype=np.uint32)
    bpg = group_size * bits // 8
    wq8 = wq.view(np.uint8)
    for r in range(n):
        for g in range(k // group_size):
            c0 = g * group_size
            for j in range(group_size):
                vals[j] = x[r, c0 + j]
            s, b, ok = quantize_group(vals, group_size, bits, metal, codes, cvt)
            if not ok:
                return r
            scales[r, g] = s
            biases[r, g] = b
            pack_group(codes, group_size, bits, wq8[r], g * bpg)
    return -1


def outputs(n: int, k: int, group_size: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fresh (wq uint32, scales float32, biases float32) for n rows of k inputs."""
    return (np.empty((n, k * bits // 32), dtype=np.uint32), np.empty((n, k // group_size), dtype=np.float32),
            np.empty((n, k // group_size), dtype=np.float32))


def affine_quantize(w: np.ndarray, group_size: int = 64, bits: int = 4, *, backend: str = "metal", name: str | None = None):
    """Same contract and bytes as kernels_ref.affine_quantize: (wq uint32, scales, biases in w's dtype)."""
    backend = _check_params(group_size, bits, backend)
    w = np.asarray(w)
    dtype = _check_dtype(w.dtype, "affine_quantize input")
    if w.ndim < 1 or w.shape[-1] == 0 or w.shape[-1] % group_size:
        raise FmtconvError(f"last dimension of shape {w.shape} must be a positive multiple of group_size={group_size}", tensor=name)
    lead, k = w.shape[:-1], w.shape[-1]
    x = readonly(w.reshape(-1, k))
    wq, s, b = outputs(x.shape[0], k, group_size, bits)
    metal = backend == "metal"
    if dtype == BF16:
        bad = _rows_bf16(x.view(np.uint16), group_size, bits, metal, wq, s, b)
    elif dtype == np.float16:
        bad = _rows_table(x.view(np.uint16), readonly(f16_widening_table()), group_size, bits, metal, wq, s, b)
    else:
        bad = _rows_f32(x, group_size, bits, metal, wq, s, b)
    if bad >= 0:
        raise FmtconvError(_NONFINITE, tensor=name)
    sshape = lead + (k // group_size,)
    return wq.reshape(lead + (k * bits // 32,)), s.astype(dtype).reshape(sshape), b.astype(dtype).reshape(sshape)
