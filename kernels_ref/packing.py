"""Packing of 2/3/4/5/6/8-bit affine codes into uint32 words, and back.

MLX stores each row as one little-endian bit stream: code k of a row occupies bits
[k*bits, (k+1)*bits) of the stream, and the stream is cut into little-endian uint32
words, so 3-, 5- and 6-bit codes straddle byte and word boundaries.
Sources: mlx/backend/cpu/quantized.cpp `quantize` (codes OR-ed at k*bits into a uint64,
written as 4 / 3 / 5 little-endian bytes per pack) and `extract_bits`; metal/kernels/
quantized.h `affine_quantize` / `affine_dequantize` use the same byte layout.
Every group holds group_size*bits bits, a multiple of 32, so groups pack independently.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)

# bits -> (codes per pack, bytes per pack); mlx/backend/common/quantized.h get_pack_factor / get_bytes_per_pack
_PACK = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 8: (1, 1)}


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., n) with n*bits % 32 == 0 -> uint32 words (..., n*bits/32)."""
    c = np.ascontiguousarray(codes, dtype=np.uint8)
    per, nbytes = _PACK[bits]
    lead = c.shape[:-1]
    n = c.shape[-1]
    if bits == 8:
        b = c
    elif bits == 4:
        v = c.view("<u2")  # little-endian: low byte = even code
        b = (v | (v >> np.uint16(4))).astype(np.uint8)
    elif bits == 2:
        v = c.view("<u4")
        b = (v | (v >> np.uint32(6)) | (v >> np.uint32(12)) | (v >> np.uint32(18))).astype(np.uint8)
    else:
        acc_t = np.uint64 if bits == 5 else np.uint32
        acc = c[..., 0::per].astype(acc_t)
        for k in range(1, per):
            acc |= c[..., k::per].astype(acc_t) << acc_t(k * bits)
        acc = acc.astype(acc.dtype.newbyteorder("<"), copy=False)
        b = acc.view(np.uint8).reshape(lead + (n // per, acc.itemsize))[..., :nbytes]
    return np.ascontiguousarray(b).reshape(lead + (n * bits // 8,)).view("<u4").astype(np.uint32, copy=False)


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words (..., m) -> uint8 codes (..., m*32/bits); inverse of `pack_codes`."""
    w = np.ascontiguousarray(words, dtype="<u4")
    per, nbytes = _PACK[bits]
    lead = w.shape[:-1]
    b = w.view(np.uint8)
    n = w.shape[-1] * 32 // bits
    if bits == 8:
        return b.copy()
    out = np.empty(lead + (n,), dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    if bits in (2, 4):
        for k in range(per):
            out[..., k::per] = (b >> np.uint8(k * bits)) & mask
        return out
    acc_t = np.uint64 if bits == 5 else np.uint32
    grouped = b.reshape(lead + (n // per, nbytes))
    acc = np.zeros(lead + (n // per,), dtype=acc_t)
    for j in range(nbytes):
        acc |= grouped[..., j].astype(acc_t) << acc_t(8 * j)
    for k in range(per):
        out[..., k::per] = ((acc >> acc_t(k * bits)) & acc_t((1 << bits) - 1)).astype(np.uint8)
    return out
