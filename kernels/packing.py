"""uint32 packing of affine codes for every width, compiled: the layout of kernels_ref/packing.py.

Code k of a row occupies bits [k*bits, (k+1)*bits) of one little-endian bit stream cut into
little-endian uint32 words; a group of 32, 64 or 128 codes fills a whole number of words.  The
kernels write that stream as bytes into the uint8 view of the (little-endian) uint32 output.
"""

from __future__ import annotations

import sys

import numpy as np

from ._jit import inline, jit, readonly

if sys.byteorder != "little":  # pragma: no cover - macOS arm64 and Linux x86-64/arm64 are all little-endian
    raise ImportError("fmtconv.kernels writes uint32 words through their byte view and needs a little-endian host")


@inline
def pack_group(codes: np.ndarray, n: int, bits: int, out: np.ndarray, o: int) -> None:
    """codes[:n] (uint8, n*bits a multiple of 32) -> out[o : o + n*bits/8] (the uint8 view of the words)."""
    if bits == 8:
        for j in range(n):
            out[o + j] = codes[j]
    elif bits == 4:
        for j in range(n // 2):
            out[o + j] = codes[2 * j] | (codes[2 * j + 1] << 4)
    elif bits == 2:
        for j in range(n // 4):
            out[o + j] = codes[4 * j] | (codes[4 * j + 1] << 2) | (codes[4 * j + 2] << 4) | (codes[4 * j + 3] << 6)
    else:  # 3, 5, 6: codes straddle bytes
        acc = np.int64(0)  # int64, not uint64: numba turns uint64 (op) int64 into float64
        filled = 0
        for j in range(n):
            acc |= np.int64(codes[j]) << filled
            filled += bits
            while filled >= 8:
                out[o] = np.uint8(acc & 0xFF)
                o += 1
                acc >>= 8
                filled -= 8


@jit
def pack_rows(codes: np.ndarray, bits: int, out: np.ndarray) -> None:
    """codes (rows, n) uint8 -> out (rows, n*bits/8) uint8."""
    rows, n = codes.shape
    for r in range(rows):
        pack_group(codes[r], n, bits, out[r], 0)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes (..., n) with n*bits % 32 == 0 -> uint32 words (..., n*bits/32), as kernels_ref.pack_codes."""
    c = np.asarray(codes, dtype=np.uint8)
    lead, n = c.shape[:-1], c.shape[-1]
    flat = readonly(c.reshape(-1, n))
    out = np.empty((flat.shape[0], n * bits // 32), dtype=np.uint32)
    pack_rows(flat, bits, out.view(np.uint8))
    return out.reshape(lead + (n * bits // 32,))
