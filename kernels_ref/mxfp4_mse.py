"""Error-minimising MLX affine straight from MXFP4 codes: each group's (scale, bias) from its code histogram.

The encoder `affine_mse` describes (same format, same error measure, never worse than min/max per group),
for MXFP4 sources, using what they are: a block of 32 inputs holds E2M1_VALUES[c] * 2^e, 16 grid points
times one power of two.  In a group of `group_size / 32` blocks whose largest exponent is e, every value is
2^e * u with u in the unit set U = {E2M1_VALUES[c] * 2^-d : c < 16, d = e - (block's exponent) <= 3}, 64
points.  For (scale, bias) = 2^e * (sigma, beta), and since rounding to bfloat16/float32 commutes with powers of
two in the normal range, the group's squared error is 4^e * sum_u n_u * err_u(sigma, beta): n_u counts the
group's values equal to 2^e * u, and err_u is the squared error of u at its nearest level, in the runtime's
dequantize arithmetic.  So the fit of the group's known small set is found by table, without decoding a value
or iterating:

  1. Histogram: the count of each E2M1 code in each block (a byte's two nibbles through two 8-lane uint64
     tables, summed per block).
  2. Candidate table (once per dtype, backend and bits): every (sigma, beta) of bfloat16 values whose levels
     span [lo, hi] for a pair lo < hi of the points {0, +-0.5, ..., +-6}, with err_u and the nearest code of
     each of the 64 points (the nearest checked exactly among the rounded levels next to the real-valued one).
     Per pattern of offsets present, candidates that another matches or beats on every point are dropped
     (they can never be the strict minimum).
  3. (groups x counts) @ (counts x candidates): every group's exact error for every candidate, up to 4^e, in
     one matrix product; the argmin is the best pair of the table (the product screens in float32, the few
     candidates near each minimum are then summed in a fixed order in float64, so the choice does not depend
     on the BLAS).
  4. MLX's own min/max pair, from a second table: MLX's arithmetic (`affine._params`, step 5) is exact under
     powers of two too, so for each pair (lowest, highest) of unit points the table holds MLX's rounded
     scale and bias and, per point, the smaller error of MLX's own code and of the exact nearest code.  With
     the group's extremes (from the codes present) this is an error never above that of MLX's bytes.
  5. The group keeps the table's pair where its error is smaller by more than the float32 per-point errors'
     rounding (1e-5 relative), else the min/max pair: never worse than min/max.
Groups the tables do not cover (a block exponent more than 3 below the group's largest, a largest exponent
outside [-100, 100], a range so small that MLX's scale floor eps applies) go through `affine_mse` on their
decoded values; a float16 compute dtype (narrow exponent range) is left to the caller's float path.
A least-squares refit of the winning pair would add ~0.5 dB at 4 bits but triples the cost; not done.
"""

from __future__ import annotations

import functools

import ml_dtypes
import numpy as np

from .affine import _check_dtype, _check_params, _params, dequantize_values, quantize_step, to_float32
from .affine_mse import _mse_chunk
from .table_driven import MX_BLOCK, BlockScratch, _code_sets, _extreme_codes, _value_table, quantize_mxfp4_blocks
from .tables import E2M1_VALUES

MAX_OFFSET = 3  # block exponents at most this far below the group's largest are tabulated
_EXP_RANGE = 100  # |largest exponent| up to which every level and product stays a normal float
_TABLE_MARGIN = 1e-5  # relative: the table's error (sums of float32 per-point errors) must beat min/max by more
_SCREEN = 1e-4  # relative window of the float32 screen around each group's smallest error
_EPS = 1e-7  # MLX's scale floor (affine.py step 2)
_ROWS_PER_STEP = 1 << 13  # blocks per vectorised step (the groups x candidates error matrix stays in L2/L3)
_BF16 = np.dtype(ml_dtypes.bfloat16)


def _unit_points() -> np.ndarray:
    """float64 (4, 16): E2M1_VALUES[c] * 2^-d, the unit set U by offset d and code c."""
    return E2M1_VALUES.astype(np.float64)[None, :] * 2.0 ** -np.arange(MAX_OFFSET + 1, dtype=np.float64)[:, None]


_UNIT32 = _unit_points().astype(np.float32)
_UV = np.unique(_UNIT32)  # the distinct unit values, sorted (-6 .. 6)


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


def ordered_sums(f: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Row sums of f * e in float64, column by column: elementwise IEEE steps, the same bits on every machine.
    f holds counts (small integers) and e float32 errors, so each product is exact."""
    acc = np.zeros(f.shape[0], dtype=np.float64)
    for j in range(f.shape[1]):
        acc += f[:, j].astype(np.float64) * e[:, j].astype(np.float64)
    return acc


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


@functools.lru_cache(maxsize=None)
def minmax_table(dtype_name: str, backend: str, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MLX's min/max at unit scale for every (lowest, highest) pair of distinct unit values, index lo * |U| + hi:
    rounded scale and bias float32 (|U|^2,), float32 errors (|U|^2, 64) of the 64 unit points (the smaller of MLX's
    own code's and of the exact nearest code's) and those codes uint8 (|U|^2, 64)."""
    dtype = np.dtype(dtype_name)
    metal = backend == "metal"
    n_bins = (1 << bits) - 1
    lo, hi = (a.reshape(-1) for a in np.meshgrid(_UV, _UV, indexing="ij"))
    w_max = np.maximum(hi, 0) if metal else hi  # GPU: w_max starts at 0 (affine.py step 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        s32, b32 = _params(lo.astype(np.float32), w_max.astype(np.float32), bits, half_away=metal)
    u = _UNIT32.reshape(-1)
    mlx_q = quantize_step(np.broadcast_to(u, (lo.size, u.size)), s32[:, None], b32[:, None], bits, metal)
    sr, br = to_float32(s32.astype(dtype)), to_float32(b32.astype(dtype))
    with np.errstate(divide="ignore", invalid="ignore"):
        q0 = np.clip(np.rint((u[None, :] - br[:, None]) / sr[:, None]), 0, n_bins)
    best_err = np.full(q0.shape, np.inf)
    best_q = mlx_q.copy()
    for q in (mlx_q, q0 - 1, q0, q0 + 1):  # MLX's own code first: ties keep it
        q = np.clip(np.nan_to_num(q), 0, n_bins).astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # pairs of equal extremes: MLX's eps scale
            d = to_float32(dequantize_values(q, sr[:, None], br[:, None], dtype, backend)).astype(np.float64)
        err = np.nan_to_num((d - u[None, :]) ** 2, nan=np.inf)
        better = err < best_err
        best_err, best_q = np.where(better, err, best_err), np.where(better, q, best_q)
    return sr, br, best_err.astype(np.float32), best_q.astype(np.uint8)


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


def _mse_step(blk: np.ndarray, s_blk: np.ndarray, per: int, bits: int, dtype: np.dtype, backend: str,
              scratch: BlockScratch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """r blocks -> per-group float32 scale and bias (dtype values) and (r, 16) uint8 codes per E2M1 code."""
    r = blk.shape[0]
    ng = r // per
    n_bins = (1 << bits) - 1
    exps = s_blk.astype(np.int32) - 127
    e_max = exps.reshape(ng, per).max(axis=1)
    offset = np.repeat(e_max, per) - exps
    covered = ((offset <= MAX_OFFSET).reshape(ng, per).all(axis=1)) & (np.abs(e_max) <= _EXP_RANGE)
    offset = np.minimum(offset, MAX_OFFSET)
    counts = code_histogram(blk).astype(np.float32)
    # The group's lowest and highest unit values, from the codes present in its blocks.
    present = _code_sets(blk, scratch.nib[:r], scratch.bits16[:r], scratch.tmp16[:r])
    hi_code, lo_code = _extreme_codes()
    w_lo = _UNIT32[offset, np.take(lo_code, present)].reshape(ng, per).min(axis=1)
    w_hi = _UNIT32[offset, np.take(hi_code, present)].reshape(ng, per).max(axis=1)
    span = (np.maximum(w_hi, 0) if backend == "metal" else w_hi) - w_lo
    scale2e = np.ldexp(np.float32(1), e_max).astype(np.float32)
    covered &= (span == 0) | (np.ldexp(span.astype(np.float64), e_max) / n_bins >= 2 * _EPS)  # else MLX's eps floor applies
    mm_id = np.searchsorted(_UV, w_lo) * _UV.size + np.searchsorted(_UV, w_hi)
    mm_s, mm_b, mm_err, mm_codes = minmax_table(dtype.name, backend, bits)
    sigma_k, beta_k, _, codes_t = candidate_table(dtype.name, backend, bits)
    # Each block's 16 points sit at rows id * 64 + offset * 16 of the 64-point tables.
    slot = (offset * 16)[:, None] + np.arange(16)
    e_mm = ordered_sums(counts, np.take(mm_err.reshape(-1), np.repeat(mm_id * 64, per)[:, None] + slot))
    e_mm = ordered_sums(np.ones((ng, per)), e_mm.reshape(ng, per))
    # The table: counts by offset and code, one matrix product per pattern of offsets present.
    k = np.empty(ng, dtype=np.intp)
    e_tab = np.empty(ng, dtype=np.float64)
    if per == 1:
        parts = [((0,), slice(None), lambda sel: counts[sel])]
    elif per == 2:  # the pattern is (0, delta): the larger-exponent block's counts, then the other's
        c0, c1 = counts[0::2], counts[1::2]
        delta = offset[0::2] + offset[1::2]
        first = offset[0::2] == 0

        def pair(sel):
            a, b, f = c0[sel], c1[sel], first[sel][:, None]
            return np.concatenate([np.where(f, a, b), np.where(f, b, a)], axis=1)

        parts = [((0,), np.flatnonzero(delta == 0), lambda sel: c0[sel] + c1[sel])]
        parts += [((0, d), np.flatnonzero(delta == d), pair) for d in range(1, MAX_OFFSET + 1)]
    else:
        by_offset = np.zeros((ng, MAX_OFFSET + 1, 16), dtype=np.float32)
        pattern = np.zeros(ng, dtype=np.int64)
        rows = np.arange(ng)
        for j in range(per):
            by_offset[rows, offset[j::per]] += counts[j::per]
            pattern |= np.left_shift(1, offset[j::per])
        parts = []
        for pat in np.unique(pattern):
            offs = tuple(d for d in range(MAX_OFFSET + 1) if pat >> d & 1)
            parts.append((offs, np.flatnonzero(pattern == pat), lambda sel, offs=offs: by_offset[sel][:, list(offs)].reshape(len(sel), -1)))
    for offs, sel, features in parts:
        if isinstance(sel, np.ndarray) and sel.size == 0:
            continue
        ids, et = pattern_table(dtype.name, backend, bits, offs)
        sel = np.arange(ng)[sel]
        f = features(sel)
        # A float32 matrix product screens the candidates: sums of non-negative terms, so its relative error
        # (<= 64 * 2^-24) is far inside _SCREEN and every true minimum survives.  The survivors' errors are
        # then summed in one fixed order in float64: a BLAS may order and fuse its sums as it likes, and
        # near-ties must not break differently on another machine.
        err = f @ et
        rows, cand = np.nonzero(err <= err.min(axis=1, keepdims=True) * np.float32(1 + _SCREEN))
        exact = ordered_sums(f[rows], et[:, cand].T)
        order = np.lexsort((cand, exact, rows))  # per group: the smallest error, ties to the earliest candidate
        best = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
        k[sel[rows[best]]] = ids[cand[best]]
        e_tab[sel[rows[best]]] = exact[best]
    use_tab = e_tab * (1 + _TABLE_MARGIN) < e_mm
    # Codes per block from whichever table won, at the block's offset.
    flat = _joined_codes(dtype.name, backend, bits)
    base = np.where(use_tab, k, codes_t.shape[0] + mm_id) * (4 * 16)
    codes = np.take(flat, np.repeat(base, per)[:, None] + slot)
    with np.errstate(over="ignore", invalid="ignore"):  # groups out of range: replaced by the float path below
        scale = np.where(use_tab, sigma_k[k], mm_s[mm_id]) * scale2e
        bias = np.where(use_tab, beta_k[k], mm_b[mm_id]) * scale2e
    if not covered.all():
        v = np.take(_value_table(dtype.name)[0], s_blk, axis=0)  # (r, 16) the blocks' values, in dtype
        _float_path(blk, v, ~covered, per, bits, dtype, backend, codes, scale, bias)
    return scale.astype(np.float32), bias.astype(np.float32), codes


@functools.lru_cache(maxsize=None)
def _joined_codes(dtype_name: str, backend: str, bits: int) -> np.ndarray:
    """The candidate table's codes, then the min/max table's, as one flat uint8 array (rows of 64 points)."""
    return np.concatenate([candidate_table(dtype_name, backend, bits)[3].reshape(-1),
                           minmax_table(dtype_name, backend, bits)[3].reshape(-1)])


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
    return quantize_mxfp4_blocks(packed, scale_codes, group_size, bits, dtype, backend, _mse_step, _ROWS_PER_STEP)
