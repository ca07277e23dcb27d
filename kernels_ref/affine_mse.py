"""Error-minimising MLX affine encoder: `affine_quantize`'s format, each group's (scale, bias) fitted to its values.

Idea after llama.cpp k-quants `make_qkx2_quants` (ggml-quants.c: try a few candidate scales, refit scale and
min by least squares to the codes each gives, keep the best); written for MLX's format and arithmetic here.

The bundle stays plain MLX affine: codes in [0, 2^bits - 1], one scale and one bias per group, stored in
the compute dtype exactly as `affine_quantize` stores them.  Only their values differ.

Error measure (`group_sse`), unweighted: the group's sum over its elements of (dequantized - w)^2, where
the dequantized values are what `affine_dequantize` computes for `backend` from the STORED scale and bias
(dtype-rounded): cpu = T(T(q*s) + b), two roundings; metal = one rounding of q*s + b.  Differences are
taken in float32 and summed in float64.

Per group of values x (float32, already rounded to the compute dtype):
  1. Starts.  For each (width, offset) of `_STARTS[bits]`: the grid of 2^bits levels spanning `width`
     of the group's range [min, max], its lowest level `offset` of the range above min.  Codes are the
     nearest levels, then scale and bias are refitted by least squares to those codes (closed form:
     the 2x2 normal equations); the start whose refit leaves the smallest residual wins.
  2. Lloyd steps: nearest codes for the current (scale, bias), least-squares refit, kept while the
     residual falls.
  3. Scale and bias are rounded to the compute dtype; the codes are recomputed, nearest for the rounded
     pair, and the error is measured exactly (`group_sse`).
  4. The group keeps whichever of this and MLX's own min/max result (`affine_quantize`) has the smaller
     `group_sse`; ties keep MLX's bytes.  So no group is ever worse than `minmax`.
Deterministic: fixed starts and iteration counts, IEEE float32/float64 NumPy arithmetic, no randomness.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from .affine import _check_params, _quantize_chunk, dequantize_values, quantize_in_chunks, to_float32

# bits -> (range widths, offsets as fractions of the slack 1 - width, Lloyd steps).  Fewer bits clip
# more (the best width falls from ~0.96 of the range at 4 bits to ~0.87 at 3); at 8 bits a single
# least-squares refit of the min/max grid with rounding-aware codes holds all of the gain (a Lloyd step loses 0.01 dB).
_STARTS: dict[int, tuple[tuple[float, ...], tuple[float, ...], int]] = {
    2: ((1.0, 0.92, 0.84, 0.76, 0.68, 0.60), (0.0, 0.25, 0.5, 0.75, 1.0), 4),
    3: ((1.0, 0.96, 0.92, 0.88, 0.84, 0.80), (0.0, 0.25, 0.5, 0.75, 1.0), 4),
    4: ((1.0, 0.98, 0.96, 0.94, 0.92, 0.90), (0.0, 0.25, 0.5, 0.75, 1.0), 4),
    5: ((1.0, 0.98, 0.96), (0.0, 0.5, 1.0), 3),
    6: ((1.0, 0.99), (0.0, 0.5, 1.0), 2),
    8: ((1.0,), (0.0,), 0),
}


def starts_for(bits: int) -> list[tuple[float, float]]:
    """(width, offset) of every start grid for `bits`, offsets as fractions of the group's range."""
    widths, offsets, _ = _STARTS[bits]
    out: list[tuple[float, float]] = []
    for w in widths:
        for f in offsets if w < 1.0 else (0.0,):
            if (w, (1.0 - w) * f) not in out:
                out.append((w, (1.0 - w) * f))
    return out


def group_sse(x: np.ndarray, codes: np.ndarray, scale: np.ndarray, bias: np.ndarray, dtype: np.dtype, backend: str) -> np.ndarray:
    """float64 (groups,): sum of (dequantize(codes, scale, bias) - x)^2 per group, the runtime's arithmetic.

    x: float32 (groups, group_size); codes: (groups, group_size) integers; scale, bias: float32 (groups,)
    holding dtype values; backend: "cpu" or "metal"/"cuda" (affine_dequantize's arithmetic).
    """
    d = to_float32(dequantize_values(np.asarray(codes, dtype=np.float32), scale[:, None], bias[:, None], dtype, backend))
    np.subtract(d, x, out=d)  # exact in float32 for the dtype values met here
    return row_dot(d, d)


def row_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 row sums of a * b: exact float64 products of float32 values, added by NumPy's pairwise sum (plain
    C, one fixed order).  Not einsum: its SIMD loops may group the terms differently on another CPU, and these
    sums decide which pair a group gets."""
    return np.multiply(a, b, dtype=np.float64).sum(axis=1)


class _Fit:
    """Per-group least-squares refit of (scale, bias) to integer codes, with its residual (float64)."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.n = float(x.shape[1])
        self.ones = np.ones(x.shape[1], dtype=np.float32)
        self.t0 = x.sum(axis=1, dtype=np.float64)
        self.v2 = row_dot(x, x)

    def sums(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """float64 sum q, sum q^2, sum q*x per group."""
        s1 = (q @ self.ones).astype(np.float64)  # integer sums: exact in float32 (< 2^24), in any order
        s2 = np.einsum("ij,ij->i", q, q).astype(np.float64)  # likewise
        with np.errstate(over="ignore", invalid="ignore"):
            t1 = row_dot(q, self.x)
        return s1, s2, t1

    def __call__(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s1, s2, t1 = self.sums(q)
        n, t0 = self.n, self.t0
        det = n * s2 - s1 * s1
        ok = det > 0
        det = np.where(ok, det, 1.0)
        with np.errstate(over="ignore", invalid="ignore"):  # values near the float32 limit: never chosen (inf/NaN)
            scale = (n * t1 - s1 * t0) / det
            bias = (t0 - scale * s1) / n
            res = self.v2 - (s2 * t0 * t0 - 2.0 * s1 * t0 * t1 + n * t1 * t1) / det
        return scale, bias, np.where(ok & (scale > 0) & np.isfinite(res), res, np.inf)


def _nearest(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, n_bins: float, out: np.ndarray) -> np.ndarray:
    """Codes of the nearest levels bias + k*scale, k in [0, n_bins], into `out` (float32)."""
    np.subtract(x, bias.astype(np.float32)[:, None], out=out)
    np.divide(out, scale.astype(np.float32)[:, None], out=out)
    np.rint(out, out=out)
    return np.clip(out, 0, n_bins, out=out)


def search_params(x: np.ndarray, bits: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Steps 1-3 of the docstring: float32 (scale, bias) per group, holding dtype values (not yet checked
    against min/max; a degenerate group may come back with a non-positive or non-finite scale)."""
    n_bins = float((1 << bits) - 1)
    mn, mx = x.min(axis=1), x.max(axis=1)
    span = (mx - mn).astype(np.float64)
    span = np.where(span > 0, span, 1.0)
    fit = _Fit(x)
    buf = np.empty_like(x)
    best_s, best_b = span / n_bins, mn.astype(np.float64)
    best_r = np.full(x.shape[0], np.inf)
    for width, offset in starts_for(bits):
        q = _nearest(x, span * (width / n_bins), mn + span * offset, n_bins, buf)
        s, b, r = fit(q)
        better = r < best_r
        best_s, best_b, best_r = np.where(better, s, best_s), np.where(better, b, best_b), np.where(better, r, best_r)
    for _ in range(_STARTS[bits][2]):
        s, b, r = fit(_nearest(x, best_s, best_b, n_bins, buf))
        better = r < best_r
        best_s, best_b, best_r = np.where(better, s, best_s), np.where(better, b, best_b), np.where(better, r, best_r)
    return _round_pair(fit, fit.sums(_nearest(x, best_s, best_b, n_bins, buf)), best_s, best_b, dtype)


def _round_pair(fit: _Fit, sums: tuple[np.ndarray, np.ndarray, np.ndarray], scale: np.ndarray, bias: np.ndarray,
                dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    return round_pair(fit.n, sums, fit.t0, fit.v2, scale, bias, dtype)


def round_pair(n: float | np.ndarray, sums: tuple[np.ndarray, np.ndarray, np.ndarray], t0: np.ndarray, v2: np.ndarray,
               scale: np.ndarray, bias: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The dtype pair near the real optimum (scale, bias) that serves fixed codes best: the scale rounded and its
    two dtype neighbours, each with the best real bias for it rounded and its neighbours (9 pairs), rated by the
    codes' exact quadratic error s2*s^2 + 2*s1*s*b + n*b^2 - 2*t1*s - 2*t0*b + v2 (sums: s1 = sum q, s2 = sum q^2,
    t1 = sum q*x; t0 = sum x, v2 = sum x^2 per group).  float32 arrays holding dtype values."""
    # Half a unit in the last place, relative: reaches the neighbours.  ml_dtypes.finfo, since older NumPy's
    # finfo rejects bfloat16 (seen with numpy 2.0.0, the declared minimum).
    rel = 2.0 ** -(ml_dtypes.finfo(dtype).nmant + 1)

    def near(v: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            c = np.stack([v, v * (1 - 2 * rel), v * (1 + 2 * rel)], axis=-1)
            return to_float32(c.astype(np.float32).astype(dtype)).astype(np.float64)

    s1, s2, t1 = (a[:, None, None] for a in sums)
    n_ = np.asarray(n, dtype=np.float64).reshape(-1, 1, 1) if np.ndim(n) else n
    sc = near(scale)[:, :, None]  # (groups, 3, 1)
    bb = near((t0[:, None] - sc[:, :, 0] * s1[:, 0]) / (n_[:, 0] if np.ndim(n) else n))  # (groups, 3 scales, 3 biases)
    with np.errstate(over="ignore", invalid="ignore"):
        err = s2 * sc * sc + 2.0 * s1 * sc * bb + n_ * bb * bb - 2.0 * t1 * sc - 2.0 * t0[:, None, None] * bb + v2[:, None, None]
    err = np.where(np.isfinite(err) & (sc > 0), err, np.inf).reshape(len(err), -1)
    k = np.argmin(err, axis=1)
    pick = np.arange(len(k))
    sc = np.broadcast_to(sc, bb.shape).reshape(len(k), -1)
    return sc[pick, k].astype(np.float32), bb.reshape(len(k), -1)[pick, k].astype(np.float32)


def exhaustive_sse(x: np.ndarray, bits: int, widths: np.ndarray, offsets: np.ndarray, steps: int = 2) -> np.ndarray:
    """A bound for the search, not an encoder: per group (rows of x, float32) the smallest squared error found
    over a dense grid of start grids (every width x offset, as fractions of the range), each refined by `steps`
    Lloyd steps, with real-valued scale and bias (no dtype rounding): slow, for `fmtconv bench encoders --bound`."""
    n_bins = float((1 << bits) - 1)
    mn = x.min(axis=1).astype(np.float64)
    span = np.maximum(x.max(axis=1) - x.min(axis=1), 1e-30).astype(np.float64)
    fit = _Fit(x)
    buf = np.empty_like(x)
    best = np.full(x.shape[0], np.inf)
    for w in widths:
        for o in offsets:
            s, b = span * (w / n_bins), mn + span * o
            r = np.full(x.shape[0], np.inf)
            for _ in range(steps + 1):
                s2, b2, r2 = fit(_nearest(x, s, b, n_bins, buf))
                ok = r2 < r
                s, b, r = np.where(ok, s2, s), np.where(ok, b2, b), np.where(ok, r2, r)
            best = np.minimum(best, r)
    return best


def choose(x: np.ndarray, mse: tuple[np.ndarray, np.ndarray, np.ndarray], minmax: tuple[np.ndarray, np.ndarray, np.ndarray],
           dtype: np.dtype, backend: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 4: per group the (codes, scale, bias) with the smaller group_sse; ties keep `minmax`."""
    e_mse = group_sse(x, mse[0], mse[1], mse[2], dtype, backend)
    e_mm = group_sse(x, minmax[0], minmax[1], minmax[2], dtype, backend)
    take = e_mse < e_mm  # False for NaN (a degenerate search): min/max is kept
    return (np.where(take[:, None], mse[0], minmax[0]), np.where(take, mse[1], minmax[1]), np.where(take, mse[2], minmax[2]))


def _mse_chunk(x: np.ndarray, bits: int, dtype: np.dtype, backend: str, name: str | None):
    """x: float32 (groups, group_size) -> (codes uint8, scale f32, bias f32), scale/bias holding dtype values."""
    mm_codes, mm_s, mm_b = _quantize_chunk(x, bits, backend, name)  # refuses inf/NaN
    mm = (mm_codes, to_float32(mm_s.astype(dtype)), to_float32(mm_b.astype(dtype)))
    scale, bias = search_params(x, bits, dtype)
    usable = np.isfinite(scale) & (scale > 0) & np.isfinite(bias)
    scale, bias = np.where(usable, scale, np.float32(1)), np.where(usable, bias, np.float32(0))
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = _nearest(x, scale, bias, float((1 << bits) - 1), np.empty_like(x)).astype(np.uint8)
    codes[~usable] = mm_codes[~usable]
    scale, bias = np.where(usable, scale, mm[1]), np.where(usable, bias, mm[2])
    return choose(x, (codes, scale, bias), mm, dtype, backend)


def affine_quantize_mse(w: np.ndarray, group_size: int = 64, bits: int = 4, *, backend: str = "metal", name: str | None = None):
    """Like `affine_quantize` (same arguments, shapes and dtypes), with error-minimising scales and biases.

    The error is measured with `backend`'s dequantize arithmetic (module docstring); per group the
    result is never worse than `affine_quantize`'s, and equal to it where nothing better was found.
    """
    backend = _check_params(group_size, bits, backend)
    return quantize_in_chunks(w, group_size, bits, "affine_quantize_mse input", name,
                              lambda x, dtype: _mse_chunk(x, bits, dtype, backend, name))
