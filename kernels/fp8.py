"""FP8 (E4M3) rows with block scales -> MLX affine, compiled, without a float intermediate in memory.

Two value rules, each the one the NumPy route applies before kernels_ref.affine_quantize:
  - E8M0 scales: the value table of kernels_ref.table_driven.fp8_e8m0_rows_to_dtype (E4M3 x 2^(s-127)
    rounded once to the compute dtype), looked up per element;
  - float scales, `--rounding mlx-lm` (formats/rounding.py round_like_mlx_lm): the float32 product
    e4m3 * scale (the exact product rounded once to float32: e4m3 has 4 significant bits, so the float64
    product the codec forms is exact), rounded to nearest-even bfloat16 here, then to the compute dtype
    through a 65536-entry table that ml_dtypes fills.
Each group's values land in a scratch buffer and go through affine_math.quantize_group.  Any inf or NaN
(E4M3 NaN codes, non-finite scales, values that overflow the dtype) makes the kernel return None, and
the caller takes the NumPy route, which refuses with its own message.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from fmtconv.kernels_ref.affine import _check_dtype, _check_params, to_float32
from fmtconv.kernels_ref.table_driven import _fp8_table
from fmtconv.kernels_ref.tables import e4m3_decode

from ._jit import jit, readonly
from .affine import outputs
from .affine_math import quantize_bf16, quantize_group
from .packing import pack_group


@functools.lru_cache(maxsize=None)
def e8m0_value_table(dtype_name: str) -> np.ndarray:
    """float32[256 * 256]: kernels_ref's E4M3 x E8M0 table (index s*256 + c), rounded to dtype, widened."""
    return np.ascontiguousarray(to_float32(_fp8_table(dtype_name)[0]))


@functools.lru_cache(maxsize=None)
def e4m3_table() -> np.ndarray:
    return np.ascontiguousarray(e4m3_decode(np.arange(256, dtype=np.uint8)), dtype=np.float32)


@functools.lru_cache(maxsize=None)
def bf16_to_dtype_table(dtype_name: str) -> np.ndarray:
    """float32[65536]: every bfloat16 bit pattern cast to dtype (ml_dtypes, nearest-even), widened."""
    bf = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(to_float32(bf.astype(np.dtype(dtype_name))))


@jit
def _scale_col(c0, group_size, bn):
    """The scale column of a group starting at input c0, or -1 when the group straddles two."""
    a = c0 // bn
    return a if (c0 + group_size - 1) // bn == a else -1


@jit
def _rows_e8m0(codes, srows, scodes, table, bn, group_size, bits, metal, wq, scales, biases):
    n, k = codes.shape
    vals = np.empty(group_size, dtype=np.float32)
    out = np.empty(group_size, dtype=np.uint8)
    cvt = np.empty(1, dtype=np.uint32)
    bpg = group_size * bits // 8
    wq8 = wq.view(np.uint8)
    for r in range(n):
        crow = codes[r]
        srow = scodes[srows[r]]
        for g in range(k // group_size):
            c0 = g * group_size
            col = _scale_col(c0, group_size, bn)
            if col >= 0:
                base = np.int64(srow[col]) << 8
                for j in range(group_size):
                    vals[j] = table[base + crow[c0 + j]]
            else:
                for j in range(group_size):
                    vals[j] = table[(np.int64(srow[(c0 + j) // bn]) << 8) + crow[c0 + j]]
            s, b, ok = quantize_group(vals, group_size, bits, metal, out, cvt)
            if not ok:
                return r
            scales[r, g] = s
            biases[r, g] = b
            pack_group(out, group_size, bits, wq8[r], g * bpg)
    return -1


@jit
def _rows_float_mlx_lm(codes, srows, sc, e4m3, to_dtype, widen_only, bn, group_size, bits, metal, wq, scales, biases):
    n, k = codes.shape
    pbuf = np.empty(group_size, dtype=np.float32)
    pbits = pbuf.view(np.uint32)
    hb = np.empty(group_size, dtype=np.uint16)
    ubuf = np.empty(group_size, dtype=np.uint32)
    vals = np.empty(group_size, dtype=np.float32)
    out = np.empty(group_size, dtype=np.uint8)
    cvt = np.empty(1, dtype=np.uint32)
    bpg = group_size * bits // 8
    wq8 = wq.view(np.uint8)
    for r in range(n):
        crow = codes[r]
        srow = sc[srows[r]]
        for g in range(k // group_size):
            c0 = g * group_size
            col = _scale_col(c0, group_size, bn)
            if col >= 0:
                sv = srow[col]
                for j in range(group_size):
                    pbuf[j] = e4m3[crow[c0 + j]] * sv  # float32 x float32: the exact product rounded once
            else:
                for j in range(group_size):
                    pbuf[j] = e4m3[crow[c0 + j]] * srow[(c0 + j) // bn]
            bad = False
            for j in range(group_size):
                u = np.int64(pbits[j])
                bad |= (u & 0x7F800000) == 0x7F800000
                hb[j] = np.uint16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)  # -> bfloat16, nearest-even
            if bad:
                return r  # inf/NaN products: the NumPy route refuses them
            if widen_only:  # bfloat16 or float32: the bfloat16 values themselves
                s, b, ok = quantize_bf16(hb, group_size, bits, metal, ubuf, out, cvt)
            else:
                for j in range(group_size):
                    vals[j] = to_dtype[hb[j]]
                s, b, ok = quantize_group(vals, group_size, bits, metal, out, cvt)
            if not ok:
                return r
            scales[r, g] = s
            biases[r, g] = b
            pack_group(out, group_size, bits, wq8[r], g * bpg)
    return -1


def affine_quantize_fp8(codes: np.ndarray, scale: np.ndarray, srows: np.ndarray, block_cols: int, *, scale_kind: str,
                        group_size: int, bits: int, dtype: np.dtype, backend: str,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """E4M3 codes (r, k) uint8 with their block scales -> (wq, scales, biases in dtype) or None (take the NumPy route).

    The arguments are formats.fp8_block.Fp8Rows' fields: scale is the scale grid flattened to 2-D, E8M0 codes
    (uint8) for scale_kind "e8m0", else float32/bfloat16/float16 values (the products rounded as mlx_lm does);
    srows the scale-grid row of each weight row.
    """
    backend = _check_params(group_size, bits, backend)
    dtype = _check_dtype(dtype, "affine_quantize_fp8 dtype")
    c = readonly(np.ascontiguousarray(codes).view(np.uint8))
    n, k = c.shape
    if k % group_size:
        raise ValueError(f"{k} inputs is not a multiple of group_size={group_size}")
    wq, sc, bi = outputs(n, k, group_size, bits)
    srows = readonly(np.asarray(srows, dtype=np.int64))
    metal = backend == "metal"
    if scale_kind == "e8m0":
        s = readonly(np.ascontiguousarray(scale).view(np.uint8))
        bad = _rows_e8m0(c, srows, s, readonly(e8m0_value_table(dtype.name)), block_cols, group_size, bits, metal, wq, sc, bi)
    else:
        s = readonly(to_float32(np.asarray(scale)))
        widen_only = dtype != np.float16  # bfloat16 values are exact in bfloat16 and float32
        tables = (readonly(e4m3_table()), readonly(bf16_to_dtype_table(dtype.name)))
        bad = _rows_float_mlx_lm(c, srows, s, *tables, widen_only, block_cols, group_size, bits, metal, wq, sc, bi)
    if bad >= 0:
        return None
    return wq, sc.astype(dtype), bi.astype(dtype)
