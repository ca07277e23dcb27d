"""MXFP4 rows -> MLX affine, compiled: the same bytes as kernels_ref.table_driven.affine_quantize_mxfp4.

Per block of 32 inputs (16 bytes, one E8M0 code): the set of E2M1 codes present gives the block's
extremes from kernels_ref's per-set tables; the group's scale and bias follow from them
(affine_math.group_params); the block's 16 possible values are quantized once into a 16-entry
code table, and every nibble is looked up there and packed.  The value tables (E2M1 x 2^(s-127)
rounded to the compute dtype) and the extreme-code tables are kernels_ref's own.
"""

from __future__ import annotations

import functools

import numpy as np

from fmtconv.kernels_ref.affine import _check_dtype, _check_params
from fmtconv.kernels_ref.table_driven import MX_BLOCK, _extreme_codes, _value_table

from ._jit import jit, readonly
from .affine import outputs
from .affine_math import ZERO, codes_of, group_params
from .packing import pack_group


@functools.lru_cache(maxsize=None)
def byte_code_sets() -> np.ndarray:
    """uint16[256]: for each packed byte, the set {low nibble, high nibble} as bits (kernels_ref's code sets)."""
    b = np.arange(256, dtype=np.uint16)
    return (np.uint16(1) << (b & np.uint16(15))) | (np.uint16(1) << (b >> np.uint16(4)))


@jit
def _rows(packed, scodes, table, finite, pair_sets, hi_code, lo_code, group_size, bits, metal, wq, scales, biases):
    n = packed.shape[0]
    k = packed.shape[1] * 2
    per = group_size // 32
    n_bins = np.float32((1 << bits) - 1)
    lut = np.empty(16 * per, dtype=np.uint8)
    tv = np.empty(16 * per, dtype=np.float32)  # the group's possible values, block by block
    codes = np.empty(group_size, dtype=np.uint8)
    bpg = group_size * bits // 8
    wq8 = wq.view(np.uint8)
    for r in range(n):
        prow = packed[r]
        srow = scodes[r]
        for g in range(k // group_size):
            b0 = g * per
            w_min = np.float32(np.inf)
            w_max = np.float32(-np.inf)
            for b in range(per):
                s = srow[b0 + b]
                if not finite[s]:
                    return r
                mask = 0
                for j in range(16):
                    mask |= pair_sets[prow[(b0 + b) * 16 + j]]
                hi = table[s, hi_code[mask]]
                lo = table[s, lo_code[mask]]
                if hi > w_max:
                    w_max = hi
                if lo < w_min:
                    w_min = lo
            if metal and w_max < ZERO:  # the GPU's w_max starts at 0
                w_max = ZERO
            scale, bias = group_params(w_min, w_max, n_bins, metal)
            scales[r, g] = scale
            biases[r, g] = bias
            for b in range(per):
                s = srow[b0 + b]
                for c in range(16):
                    tv[b * 16 + c] = table[s, c]
            codes_of(tv, 16 * per, bias, scale, n_bins, metal, lut)
            if bits == 4:  # code pairs map byte to byte: element 2i in the low nibble, as in the source
                orow = wq8[r]
                for b in range(per):
                    o = (b0 + b) * 16
                    for j in range(16):
                        byte = prow[o + j]
                        orow[o + j] = lut[b * 16 + (byte & 15)] | (lut[b * 16 + (byte >> 4)] << 4)
                continue
            for b in range(per):
                for j in range(16):
                    byte = prow[(b0 + b) * 16 + j]
                    codes[b * 32 + 2 * j] = lut[b * 16 + (byte & 15)]
                    codes[b * 32 + 2 * j + 1] = lut[b * 16 + (byte >> 4)]
            pack_group(codes, group_size, bits, wq8[r], g * bpg)
    return -1


def affine_quantize_mxfp4(packed: np.ndarray, scale_codes: np.ndarray, group_size: int = 64, bits: int = 4, *,
                          dtype: np.dtype, backend: str = "metal") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Same contract and bytes as kernels_ref.table_driven.affine_quantize_mxfp4 (None: take the float path)."""
    backend = _check_params(group_size, bits, backend)
    dtype = _check_dtype(dtype, "affine_quantize_mxfp4 dtype")
    p = readonly(np.ascontiguousarray(packed).view(np.uint8))
    s = readonly(np.ascontiguousarray(scale_codes).view(np.uint8))
    n, half = p.shape
    k = half * 2
    if k % group_size or s.shape != (n, k // MX_BLOCK):
        raise ValueError(f"packed {p.shape} and scale codes {s.shape} do not fit group_size={group_size}")
    table, finite = _value_table(dtype.name)
    hi_code, lo_code = _extreme_codes()
    wq, sc, bi = outputs(n, k, group_size, bits)
    tables = (readonly(table), readonly(finite), readonly(byte_code_sets()), readonly(hi_code), readonly(lo_code))
    if _rows(p, s, *tables, group_size, bits, backend == "metal", wq, sc, bi) >= 0:
        return None
    return wq, sc.astype(dtype), bi.astype(dtype)
