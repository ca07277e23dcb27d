"""Error-minimising MLX affine straight from MXFP4 codes: each group's (scale, bias) from its code histogram.

The encoder `affine_mse` describes (same format, same error measure, never worse than min/max per group),
for MXFP4 sources, using what they are: a block of 32 inputs holds E2M1_VALUES[c] * 2^e, 16 grid points
times one power of two.  In a group of `group_size / 32` blocks whose largest exponent is e, every value is
2^e * u with u in the unit set U = {E2M1_VALUES[c] * 2^-d : c < 16, d = e - (block's exponent) <= 3}, 64
points.  For (scale, bias) = 2^e * (sigma, beta), and since rounding to bfloat16/float32 commutes with powers of
two in the normal range, the group's squared error is 4^e * sum_u n_u * err_u(sigma, beta): n_u counts the
group's values equal to 2^e * u, and err_u is the squared error of u at its nearest level, in the runtime's
dequantize arithmetic.  So the search over a candidate set becomes one matrix product, computed from the codes
without decoding a value:

  1. Histogram: the count of each E2M1 code in each block (a byte's two nibbles through two 8-lane uint64
     tables, summed per block).
  2. Table (once per dtype, backend and bits): for every candidate (sigma, beta), all bfloat16 values, the
     levels spanning [lo, hi] for every pair lo < hi of the points {0, +-0.25, ..., +-6} (steps of 0.5, and of
     0.25 below 2): err_u and the nearest code of each of the 64 points u, the nearest checked exactly among
     the rounded levels around the real-valued one.
  3. (groups x 64 counts) @ (64 x candidates) gives every group's exact error for every candidate (up to
     4^e); its argmin is the exact best pair of the table: no iteration, no decoding.
  4. Least-squares refit of (sigma, beta) to that pair's codes, weighted by the counts (closed form), then two
     Lloyd steps (nearest codes, refit) on the 64 points; rounded to the compute dtype.
  5. The group keeps, of the table's pair, the refit and MLX's own min/max result (`table_driven`), the one
     with the smallest squared error measured at the true scale (`affine_mse.group_sse`'s arithmetic over the
     block's 16 values, weighted by their counts); ties keep MLX's.
Groups the table does not cover (a block exponent more than 3 below the group's largest, a largest exponent
outside [-100, 100]) go through `affine_mse` on their decoded values; a float16 compute dtype (narrow exponent
range) is left to the caller's float path.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from .affine import _check_dtype, _check_params, dequantize_values, to_float32
from .affine_mse import _mse_chunk
from .table_driven import MX_BLOCK, BlockScratch, CodePacker, _value_table, minmax_block_codes
from .tables import E2M1_VALUES

MAX_OFFSET = 3  # block exponents at most this far below the group's largest are tabulated
_EXP_RANGE = 100  # |largest exponent| up to which every level and product stays a normal float
_TABLE_MARGIN = 1e-5  # relative: the table's float32 error sums must beat min/max by more than their rounding
_ROWS_PER_STEP = 1 << 13  # blocks per vectorised step (the groups x candidates error matrix stays in L2/L3)
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _unit_points() -> np.ndarray:
    """float64 (4, 16): E2M1_VALUES[c] * 2^-d, the unit set U by offset d and code c."""
    return E2M1_VALUES.astype(np.float64)[None, :] * 2.0 ** -np.arange(MAX_OFFSET + 1, dtype=np.float64)[:, None]


_UNIT32 = _unit_points().astype(np.float32)


def _ends() -> np.ndarray:
    """The points {0, +-0.5, ..., +-6} (steps of 0.5) that candidate grids start and end on."""
    pos = np.arange(1, 13) * 0.5
    return np.concatenate([-pos[::-1], [0.0], pos])


@functools.lru_cache(maxsize=None)
def candidate_table(dtype_name: str, backend: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sigma, beta) float32 (K,), squared errors float32 (64, K) and nearest codes uint8 (K, 64) of the unit points."""
    dtype = np.dtype(dtype_name)
    n_bins = (1 << bits) - 1
    ends = _ends()
    lo, hi = np.meshgrid(ends, ends, indexing="ij")
    keep = hi > lo
    # Candidates are bfloat16 values (exact in float32 too), so 2^e * candidate is a value of either dtype.
    sigma = to_float32(((hi[keep] - lo[keep]) / n_bins).astype(np.float32).astype(_BF16))
    beta = to_float32(lo[keep].astype(np.float32).astype(_BF16))
    pairs = np.unique(np.stack([sigma, beta], axis=1), axis=0)
    sigma, beta = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    u = _unit_points().reshape(-1).astype(np.float32)  # exact: E2M1 values have 2 significant bits
    q0 = np.clip(np.rint((u[None, :] - beta[:, None]) / sigma[:, None]), 0, n_bins)
    best_err = np.full(q0.shape, np.inf)
    best_q = q0.copy()
    for dq in (-1.0, 0.0, 1.0):  # the exact nearest of the rounded levels lies next to the real-valued one
        q = np.clip(q0 + dq, 0, n_bins).astype(np.float32)
        d = to_float32(dequantize_values(q, sigma[:, None], beta[:, None], dtype, backend)).astype(np.float64)
        err = (d - u[None, :]) ** 2
        better = err < best_err
        best_err, best_q = np.where(better, err, best_err), np.where(better, q, best_q)
    return sigma, beta, np.ascontiguousarray(best_err.T.astype(np.float32)), best_q.astype(np.uint8)


@functools.lru_cache(maxsize=None)
def pattern_table(dtype_name: str, backend: str, bits: int, offsets: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """For groups whose blocks have exactly these exponent offsets: (candidate ids, errors float32 (16 * len(offsets), K'))
    of the candidates no other candidate matches or beats on every one of those points (the others can never be
    the strict minimum, so dropping them keeps the table's exact minimum)."""
    _, _, err_t, _ = candidate_table(dtype_name, backend, bits)
    cols = np.concatenate([np.arange(16) + 16 * d for d in offsets])
    e = err_t[cols].T.astype(np.float64)  # (K, F)
    keep = np.ones(len(e), dtype=bool)
    earlier = np.arange(len(e))
    for i in range(len(e)):
        covers = (e <= e[i]).all(axis=1) & ((e < e[i]).any(axis=1) | (earlier < i)) & keep
        covers[i] = False
        keep[i] = not covers.any()
    ids = np.flatnonzero(keep)
    return ids, np.ascontiguousarray(err_t[cols][:, ids])


# Per byte: the counts of E2M1 codes 0-7 (lane c of the low word) and 8-15 (high word) among its two nibbles.
def _pair_luts() -> tuple[np.ndarray, np.ndarray]:
    b = np.arange(256)
    lanes = []
    for base in (0, 8):
        lane = np.zeros(256, dtype=np.uint64)
        for nib in (b & 15, b >> 4):
            inside = (nib >= base) & (nib < base + 8)
            lane += np.where(inside, np.left_shift(np.uint64(1), (8 * (nib - base) * inside).astype(np.uint64)), 0).astype(np.uint64)
        lanes.append(lane)
    return lanes[0], lanes[1]


_PAIR_LO, _PAIR_HI = _pair_luts()


def code_histogram(blk: np.ndarray) -> np.ndarray:
    """uint8 (r, 16) packed E2M1 pairs -> uint8 (r, 16): how often each code occurs in each 32-element block."""
    out = np.empty((blk.shape[0], 2), dtype=np.uint64)
    out[:, 0] = np.take(_PAIR_LO, blk).sum(axis=1)  # 8 lanes of <= 32 each: no carry between lanes
    out[:, 1] = np.take(_PAIR_HI, blk).sum(axis=1)
    return out.astype("<u8", copy=False).view(np.uint8).reshape(-1, 16)


def _weighted_sse(n: np.ndarray, d: np.ndarray, v: np.ndarray, per: int) -> np.ndarray:
    """float64 (k, groups): sum of n * (d - v)^2 over each group's blocks' 16 values, for k stacked candidates
    (d: (k, r, 16), v: (r, 16), float32 dtype values; the differences are exact in float32)."""
    diff = np.subtract(d, v)
    sse = np.einsum("ij,kij,kij->ki", n, diff, diff, dtype=np.float64)
    return sse if per == 1 else sse.reshape(sse.shape[0], -1, per).sum(axis=2)


def _fold(a: np.ndarray, per: int) -> np.ndarray:
    """float64 sums of each run of `per` consecutive block sums (one group's blocks)."""
    a = a.astype(np.float64)
    return a if per == 1 else a.reshape(-1, per).sum(axis=1)


def _nearest(u: np.ndarray, sigma: np.ndarray, beta: np.ndarray, per: int, n_bins: int) -> np.ndarray:
    s = np.repeat(sigma.astype(np.float32), per)[:, None]
    b = np.repeat(beta.astype(np.float32), per)[:, None]
    return np.clip(np.rint((u - b) / s), 0, n_bins)


def _refit(n: np.ndarray, u: np.ndarray, q: np.ndarray, per: int, group_size: int, dtype: np.dtype,
           fallback: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (sigma, beta) per group for codes q of its blocks' unit points u, weighted by the counts n,
    rounded to dtype.  Block sums are exact in float32 (integers and dyadic values of at most 20 significant
    bits); groups fold in float64.  (Rating the rounded pair's neighbours, as affine_mse does, gains < 0.02 dB here.)"""
    nu, nq = n * u, n * q
    t0 = _fold(nu.sum(axis=1), per)
    s1, s2, t1 = _fold(nq.sum(axis=1), per), _fold(np.einsum("ij,ij->i", nq, q), per), _fold(np.einsum("ij,ij->i", nu, q), per)
    det = group_size * s2 - s1 * s1
    ok = det > 0
    det = np.where(ok, det, 1.0)
    sigma = (group_size * t1 - s1 * t0) / det
    ok &= sigma > 0
    sigma = np.where(ok, sigma, fallback[0])
    beta = np.where(ok, (t0 - sigma * s1) / group_size, fallback[1])
    with np.errstate(over="ignore", invalid="ignore"):
        return to_float32(sigma.astype(np.float32).astype(dtype)), to_float32(beta.astype(np.float32).astype(dtype))


def _mse_step(blk: np.ndarray, s_blk: np.ndarray, per: int, bits: int, dtype: np.dtype, backend: str,
              scratch: BlockScratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """r blocks -> per-group float32 scale and bias (dtype values) and (r, 16) uint8 codes per E2M1 code."""
    r = blk.shape[0]
    ng = r // per
    n_bins = (1 << bits) - 1
    table, _ = _value_table(dtype.name)
    v = np.take(table, s_blk, axis=0)  # (r, 16) the blocks' values at the true scale, in dtype
    mm_s32, mm_b32, mm_codes = minmax_block_codes(blk, s_blk, per, bits, dtype, backend, scratch)
    mm_s, mm_b = to_float32(mm_s32.astype(dtype)), to_float32(mm_b32.astype(dtype))

    exps = s_blk.astype(np.int32) - 127
    e_max = exps.reshape(ng, per).max(axis=1)
    offset = np.repeat(e_max, per) - exps
    covered = ((offset <= MAX_OFFSET).reshape(ng, per).all(axis=1)) & (np.abs(e_max) <= _EXP_RANGE)
    offset = np.minimum(offset, MAX_OFFSET)
    counts = code_histogram(blk).astype(np.float32)
    sigma_k, beta_k, _, codes_t = candidate_table(dtype.name, backend, bits)
    # 3. Every candidate's exact error (up to 4^e) from the counts by offset and code: one product per pattern
    # of offsets present (groups of one block: always the pattern (0,)).
    k = np.empty(ng, dtype=np.intp)
    e_tab = np.empty(ng, dtype=np.float64)
    if per == 1:
        feats, pattern = counts[:, None, :], np.ones(ng, dtype=np.int64)
    else:
        feats = np.zeros((ng, MAX_OFFSET + 1, 16), dtype=np.float32)
        pattern = np.zeros(ng, dtype=np.int64)
        rows = np.arange(ng)
        for j in range(per):
            feats[rows, offset[j::per]] += counts[j::per]
            pattern |= np.left_shift(1, offset[j::per])
    for pat in np.unique(pattern):
        offs = tuple(d for d in range(MAX_OFFSET + 1) if pat >> d & 1)
        ids, et = pattern_table(dtype.name, backend, bits, offs)
        sel = slice(None) if (pattern == pat).all() else np.flatnonzero(pattern == pat)
        f = feats[sel]
        f = f[:, list(offs)] if f.shape[1] != len(offs) else f
        err = f.reshape(-1, 16 * len(offs)) @ et
        kl = np.argmin(err, axis=1)
        k[sel] = ids[kl]
        e_tab[sel] = np.take_along_axis(err, kl[:, None], axis=1)[:, 0]
    u = _UNIT32[offset]  # (r, 16) the blocks' values at unit scale
    q_tab = np.take(codes_t.reshape(-1), (np.repeat(k, per) * (4 * 16) + offset * 16)[:, None] + np.arange(16)).astype(np.float32)
    # 4. Least-squares refit to the table pair's codes, rounded to dtype; its nearest codes.
    fallback = (sigma_k[k].astype(np.float64), beta_k[k].astype(np.float64))
    sig_r, bet_r = _refit(counts, u, q_tab, per, per * MX_BLOCK, dtype, fallback)
    good = covered & np.isfinite(sig_r) & (sig_r > 0) & np.isfinite(bet_r)
    sig_r, bet_r = np.where(good, sig_r, np.float32(1)), np.where(good, bet_r, np.float32(0))
    q_fit = _nearest(u, sig_r, bet_r, per, n_bins)
    # 5. The errors of min/max and of the refit at the true scale (2^e is exact in float32); the table pair's from
    # step 3 (float32 sums of exact terms: within 1e-5 of exact, so it must win by more).  Ties keep min/max.
    scale2e = np.ldexp(np.float32(1), e_max).astype(np.float32)
    fit_s, fit_b = sig_r * scale2e, bet_r * scale2e
    d = dequantize_values(np.stack([mm_codes.astype(np.float32), q_fit]),
                          np.stack([np.repeat(mm_s, per), np.repeat(fit_s, per)])[:, :, None],
                          np.stack([np.repeat(mm_b, per), np.repeat(fit_b, per)])[:, :, None], dtype, backend)
    e_mm, e_fit = _weighted_sse(counts, to_float32(d), v, per)
    e_tab = np.where(covered, e_tab * np.ldexp(1.0, 2 * e_max.astype(np.int64)) * (1 + _TABLE_MARGIN), np.inf)
    e_fit = np.where(good, e_fit, np.inf)
    best = np.where(e_fit < np.minimum(e_mm, e_tab), 2, np.where(e_tab < e_mm, 1, 0))
    pick = np.repeat(best, per)[:, None]
    codes = np.where(pick == 0, mm_codes, np.where(pick == 1, q_tab, q_fit)).astype(np.uint8)
    scale = np.choose(best, [mm_s, sigma_k[k] * scale2e, fit_s]).astype(np.float32)
    bias = np.choose(best, [mm_b, beta_k[k] * scale2e, fit_b]).astype(np.float32)
    if not covered.all():
        _float_path(blk, v, ~covered, per, bits, dtype, backend, codes, scale, bias)
    return scale, bias, codes


def _float_path(blk: np.ndarray, v: np.ndarray, groups: np.ndarray, per: int, bits: int, dtype: np.dtype, backend: str,
                codes: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> None:
    """Groups outside the table: `affine_mse` on their decoded values; equal values get equal codes, so each
    block's codes per E2M1 code are read back from the elements (in place into codes, scale, bias)."""
    gi = np.flatnonzero(groups)
    bi = (gi[:, None] * per + np.arange(per)).reshape(-1)
    nib = np.empty((bi.size, MX_BLOCK), dtype=np.uint8)
    nib[:, 0::2] = blk[bi] & 0x0F
    nib[:, 1::2] = blk[bi] >> 4
    x = np.take_along_axis(v[bi], nib.astype(np.intp), axis=1).reshape(gi.size, per * MX_BLOCK)
    c, s, b = _mse_chunk(x, bits, dtype, backend, None)
    lut = codes[bi]
    np.put_along_axis(lut, nib.astype(np.intp), c.reshape(bi.size, MX_BLOCK), axis=1)
    codes[bi] = lut
    scale[gi], bias[gi] = s, b


def affine_quantize_mxfp4_mse(
    packed: np.ndarray,
    scale_codes: np.ndarray,
    group_size: int = 64,
    bits: int = 4,
    *,
    dtype: np.dtype,
    backend: str = "metal",
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """MXFP4 rows -> (wq uint32, scales, biases), error-minimising (module docstring); arguments as
    `table_driven.affine_quantize_mxfp4`.  None where the caller's float path must run instead: a float16
    compute dtype, or a block whose values are not finite in dtype."""
    backend = _check_params(group_size, bits, backend)
    dtype = _check_dtype(dtype, "affine_quantize_mxfp4_mse dtype")
    if dtype == np.float16:
        return None
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
    step = max(per, _ROWS_PER_STEP // per * per)
    scratch = BlockScratch(min(step, n_blocks))
    packer = CodePacker(n_blocks, bits)
    for b0 in range(0, n_blocks, step):
        b1 = min(n_blocks, b0 + step)
        blk, s_blk = blocks[b0:b1], s_flat[b0:b1]
        g_scale, g_bias, lut = _mse_step(blk, s_blk, per, bits, dtype, backend, scratch)
        scales[b0 // per : b1 // per], biases[b0 // per : b1 // per] = g_scale, g_bias
        packer.put(b0, blk, lut, scratch)
    sshape = (n, k // group_size)
    return packer.words(n, k), scales.astype(dtype).reshape(sshape), biases.astype(dtype).reshape(sshape)
