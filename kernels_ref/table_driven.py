"""Table-driven routes from MXFP4 and FP8-E8M0 codes, byte-identical to the float path (decode, round, quantize).

`affine_quantize_mxfp4(packed, scale_codes, ...)` returns exactly what
`affine_quantize(round(mxfp4 values, dtype), group_size, bits, backend=...)` returns, where the
values are E2M1_VALUES[code] * e8m0_decode(scale) in float32 (what the MXFP4 codec decodes) and
`round` is one cast to `dtype` (what `Exact.to` does for float32 values).

Why it is the same arithmetic: an MXFP4 block of 32 inputs holds at most 16 distinct values,
E2M1_VALUES[0..15] times the block's power-of-two scale.  Every step of affine_quantize is either
a min/max over a group (decided by which codes occur) or elementwise in each value with the
group's float32 scale and bias (affine.py steps 2-6).  So this module
  1. rounds the 16 values of every E8M0 code to `dtype` once (a 256 x 16 table, same ops),
  2. finds the smallest and largest value of each group from the set of codes present,
  3. computes scale and bias with affine.py's own `_params` on those exact float32 extremes,
  4. quantizes the 16 table values of each block with affine.py's step-5 operations,
  5. looks every input nibble up in its block's 16 codes and packs them as `pack_codes` does.
Zero signs cannot change a result (affine.py docstring, steps 2-4: a zero extreme gives q0 = 0).
Where a table value is not finite (an E8M0 code whose values overflow `dtype`) it returns None
and the caller takes the float path, which refuses such input itself.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from .affine import _check_dtype, _check_params, _params, quantize_step, to_float32
from .packing import pack_codes
from .tables import E2M1_VALUES, e4m3_decode, e8m0_decode

MX_BLOCK = 32  # OCP MX v1.0: one E8M0 scale per 32 elements
_ROWS_PER_STEP = 1 << 15  # blocks per vectorised step (index arrays stay in L2/L3)


@functools.lru_cache(maxsize=None)
def _value_table(dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 [256, 16]: E2M1 value x 2^(s-127) rounded once to dtype, widened back; and finite rows."""
    dtype = np.dtype(dtype_name)
    with np.errstate(over="ignore", invalid="ignore"):
        raw = E2M1_VALUES[None, :] * e8m0_decode(np.arange(256, dtype=np.uint8))[:, None]  # as Mxfp4Codec.decode
        table = to_float32(raw.astype(dtype))
    table = np.ascontiguousarray(table, dtype=np.float32)
    return table, np.isfinite(table).all(axis=1)


@functools.lru_cache(maxsize=None)
def _extreme_codes() -> tuple[np.ndarray, np.ndarray]:
    """For every 16-bit set of E2M1 codes: the code of the largest and of the smallest value."""
    masks = np.arange(1 << 16, dtype=np.uint32)
    present = ((masks[:, None] >> np.arange(16, dtype=np.uint32)) & 1).astype(bool)
    order = np.where(present, E2M1_VALUES[None, :], np.inf)
    lo = np.argmin(order, axis=1).astype(np.uint8)
    order = np.where(present, E2M1_VALUES[None, :], -np.inf)
    hi = np.argmax(order, axis=1).astype(np.uint8)
    return hi, lo


def _code_sets(packed: np.ndarray, nib: np.ndarray, bits: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """uint8 (blocks, 16) packed pairs -> uint16 (blocks,) with bit c set when code c occurs in the block.

    nib (uint8), bits and tmp (uint16) are scratch arrays of packed's shape.
    """
    one = np.uint16(1)
    np.bitwise_and(packed, np.uint8(0x0F), out=nib)
    np.left_shift(one, nib, out=bits)
    np.right_shift(packed, np.uint8(4), out=nib)
    np.left_shift(one, nib, out=tmp)
    bits |= tmp
    w = bits.view(np.uint64)  # 4 words of 4 lanes per block
    acc = w[:, 0] | w[:, 1]
    acc |= w[:, 2]
    acc |= w[:, 3]
    acc |= acc >> np.uint64(32)
    acc |= acc >> np.uint64(16)
    return acc.astype(np.uint16)


def _group_fold(op: np.ufunc, v: np.ndarray, per: int) -> np.ndarray:
    """Reduce each run of `per` consecutive blocks (one affine group) with op, without a short-axis reduce."""
    if per == 1:
        return v
    out = op(v[0::per], v[1::per])
    for j in range(2, per):
        op(out, v[j::per], out=out)
    return out


class BlockScratch:
    """Work arrays reused by every step of a table route: fresh large temporaries cost page faults each time."""

    def __init__(self, m: int):
        self.nib = np.empty((m, 16), dtype=np.uint8)
        self.bits16, self.tmp16 = np.empty((m, 16), dtype=np.uint16), np.empty((m, 16), dtype=np.uint16)
        self.y = np.empty((m, 16), dtype=np.float32)
        self.idx = np.empty((m, 16), dtype=np.intp)
        self.lo, self.hi = np.empty((m, 16), dtype=np.uint8), np.empty((m, 16), dtype=np.uint8)
        self.base = (np.arange(m, dtype=np.intp) * 16)[:, None]


def minmax_block_codes(blk: np.ndarray, s_blk: np.ndarray, per: int, bits: int, dtype: np.dtype, backend: str,
                       scratch: BlockScratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps 2-4 of the module docstring for r blocks (r a multiple of per): the float32 scale and bias of each
    group (affine.py's `_params` on the exact extremes) and (r, 16) uint8, the code of each block's 16 table values."""
    table, _ = _value_table(np.dtype(dtype).name)
    hi_code, lo_code = _extreme_codes()
    metal = backend == "metal"
    r = blk.shape[0]
    sc = s_blk.astype(np.intp) * 16
    present = _code_sets(blk, scratch.nib[:r], scratch.bits16[:r], scratch.tmp16[:r])
    flat_table = table.reshape(-1)
    w_max = _group_fold(np.maximum, np.take(flat_table, sc + np.take(hi_code, present)), per)
    w_min = _group_fold(np.minimum, np.take(flat_table, sc + np.take(lo_code, present)), per)
    if metal:
        np.maximum(w_max, 0, out=w_max)  # GPU: w_max starts at 0 (affine.py step 1)
    g_scale, g_bias = _params(w_min, w_max, bits, half_away=metal)
    # Step 5 on the 16 table values of each block, with its group's float32 scale and bias.
    y = scratch.y[:r]
    np.take(table, s_blk, axis=0, out=y)
    quantize_step(y, np.repeat(g_scale, per)[:, None], np.repeat(g_bias, per)[:, None], bits, metal, out=y)
    return g_scale, g_bias, y.astype(np.uint8)


class CodePacker:
    """Looks every input nibble up in its block's 16 codes and packs the codes as `pack_codes` does."""

    def __init__(self, n_blocks: int, bits: int):
        self.bits = bits
        self.out_bytes = np.empty((n_blocks, MX_BLOCK // 2), dtype=np.uint8) if bits == 4 else None
        self.codes = None if bits == 4 else np.empty((n_blocks, MX_BLOCK), dtype=np.uint8)

    def put(self, b0: int, blk: np.ndarray, lut: np.ndarray, scratch: BlockScratch) -> None:
        """Blocks [b0, b0 + r): packed input nibbles `blk` (r, 16) and their codes per E2M1 code `lut` (r, 16)."""
        r = blk.shape[0]
        flat = lut.reshape(-1)
        ix, lo, hi, nib = scratch.idx[:r], scratch.lo[:r], scratch.hi[:r], scratch.nib[:r]
        np.bitwise_and(blk, np.uint8(0x0F), out=nib)
        np.add(scratch.base[:r], nib, out=ix)
        np.take(flat, ix, out=lo)
        np.right_shift(blk, np.uint8(4), out=nib)
        np.add(scratch.base[:r], nib, out=ix)
        if self.bits == 4:  # packing.pack_codes for 4 bits: element 2i in the low nibble of byte i
            np.take(flat << np.uint8(4), ix, out=hi)
            np.bitwise_or(lo, hi, out=self.out_bytes[b0 : b0 + r])
        else:
            np.take(flat, ix, out=hi)
            c = self.codes[b0 : b0 + r]
            c[:, 0::2] = lo
            c[:, 1::2] = hi

    def words(self, n: int, k: int) -> np.ndarray:
        if self.bits == 4:
            return self.out_bytes.reshape(n, k // 2).view("<u4").astype(np.uint32, copy=False)
        return pack_codes(self.codes.reshape(n, k), self.bits)


def affine_quantize_mxfp4(
    packed: np.ndarray,
    scale_codes: np.ndarray,
    group_size: int = 64,
    bits: int = 4,
    *,
    dtype: np.dtype,
    backend: str = "metal",
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """MXFP4 rows -> (wq uint32, scales, biases) exactly as affine_quantize on the decoded, rounded rows.

    packed: uint8 (n, k/2), two E2M1 codes per byte, the even element in the low nibble.
    scale_codes: uint8 (n, k/32) E8M0 codes (255 = NaN must have been refused by the caller).
    dtype: the compute dtype the values are rounded to (scales and biases come back in it).
    Returns None where some block's values are not finite in dtype (use the float path).
    """
    backend = _check_params(group_size, bits, backend)
    dtype = _check_dtype(dtype, "affine_quantize_mxfp4 dtype")
    return quantize_mxfp4_blocks(packed, scale_codes, group_size, bits, dtype, backend, minmax_block_codes)


BlockStep = Callable[[np.ndarray, np.ndarray, int, int, np.dtype, str, BlockScratch], tuple[np.ndarray, np.ndarray, np.ndarray]]


def quantize_mxfp4_blocks(packed: np.ndarray, scale_codes: np.ndarray, group_size: int, bits: int, dtype: np.dtype,
                          backend: str, block_step: BlockStep, rows_per_step: int = _ROWS_PER_STEP
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The MXFP4 -> affine driver shared by the encoders: blocks in steps of whole groups, each step's per-group
    (scale, bias) and per-block code tables from block_step, codes packed.  None where a block's values are not
    finite in dtype."""
    p = np.ascontiguousarray(packed).view(np.uint8)
    s = np.ascontiguousarray(scale_codes).view(np.uint8)
    n, half = p.shape
    k = half * 2
    if k % group_size or s.shape != (n, k // MX_BLOCK):
        raise ValueError(f"packed {p.shape} and scale codes {s.shape} do not fit group_size={group_size}")
    _, finite = _value_table(dtype.name)
    s_flat = s.reshape(-1)
    if not finite[s_flat].all():
        return None
    per = group_size // MX_BLOCK
    n_blocks = s_flat.size
    blocks = p.reshape(n_blocks, MX_BLOCK // 2)
    scales = np.empty(n_blocks // per, dtype=np.float32)
    biases = np.empty(n_blocks // per, dtype=np.float32)
    step = max(per, rows_per_step // per * per)
    scratch = BlockScratch(min(step, n_blocks))
    packer = CodePacker(n_blocks, bits)
    for b0 in range(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        blk, s_blk = blocks[b0:b1], s_flat[b0:b1]
        g_scale, g_bias, lut = block_step(blk, s_blk, per, bits, dtype, backend, scratch)
        scales[b0 // per : b1 // per], biases[b0 // per : b1 // per] = g_scale, g_bias
        packer.put(b0, blk, lut, scratch)
    sshape = (n, k // group_size)
    return packer.words(n, k), scales.astype(dtype).reshape(sshape), biases.astype(dtype).reshape(sshape)


@functools.lru_cache(maxsize=None)
def _fp8_table(dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    """[256 * 256] values E4M3[c] * 2^(s-127) at index s*256 + c, computed in float32 as
    Fp8BlockCodec.decode does, rounded once to dtype; and per scale code s whether every
    non-NaN code gives a finite value."""
    dtype = np.dtype(dtype_name)
    with np.errstate(over="ignore", invalid="ignore"):
        raw = e4m3_decode(np.arange(256, dtype=np.uint8))[None, :] * e8m0_decode(np.arange(256, dtype=np.uint8))[:, None]
        table = raw.astype(dtype)
    finite = np.isfinite(table.astype(np.float32))
    finite[:, [0x7F, 0xFF]] = True  # NaN codes are checked on the data
    return np.ascontiguousarray(table.reshape(-1)), finite.all(axis=1)


def fp8_e8m0_rows_to_dtype(
    codes: np.ndarray, scale_codes: np.ndarray, start: int, rows_per_matrix: int, block: tuple[int, int], dtype: np.dtype
) -> np.ndarray | None:
    """E4M3 codes x 128x128-style E8M0 block scales -> values rounded once to dtype, by table lookup.

    codes: uint8 (r, k), rows [start, start + r) of the weight flattened to 2-D (matrices of
    `rows_per_matrix` rows stacked); scale_codes: uint8 (matrices * ceil(rows_per_matrix / bm), ceil(k / bn)).
    Equals round_to_dtype(e4m3_decode(codes) * e8m0_decode(scale per element), dtype) (the FP8 block
    codec's decode then `Exact.to`).  None where that needs the float path: E4M3 NaN codes, values that
    overflow dtype, or k not a multiple of bn.
    """
    dtype = np.dtype(dtype)
    bm, bn = block
    r, k = codes.shape
    if k % bn:
        return None
    table, finite = _fp8_table(dtype.name)
    rr = np.arange(start, start + r)
    blocks_per_matrix = -(-rows_per_matrix // bm)
    srows = (rr // rows_per_matrix) * blocks_per_matrix + (rr % rows_per_matrix) // bm
    s = np.ascontiguousarray(scale_codes).view(np.uint8).reshape(-1, k // bn)[srows]
    if not finite[s].all() or np.any((codes & np.uint8(0x7F)) == 0x7F):
        return None
    out = np.empty((r, k), dtype=dtype)
    step = max(1, (1 << 18) // k)  # rows per step: the intp index buffer stays small and is reused
    idx = np.empty((min(step, r), k // bn, bn), dtype=np.intp)
    for a in range(0, r, step):
        b = min(r, a + step)
        ix = idx[: b - a]
        np.add(np.left_shift(s[a:b].astype(np.intp), 8)[:, :, None], codes[a:b].reshape(b - a, k // bn, bn), out=ix)
        np.take(table, ix.reshape(b - a, k), out=out[a:b])
    return out
