"""Quality against the source: SQNR (dB) and max abs error per output tensor, then per module pattern.

`compare_with_source` streams row blocks of each output tensor, dequantized with `fmtconv.kernels_ref`
(never re-derived here), against float32 values the caller supplies for the same rows.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv.convert.bundle.reader import (
    DTYPE_NAMES,
    FLOAT_DTYPES,
    ROW_BLOCK_ELEMENTS,
    Bundle,
    QuantParams,
    open_bundle,
    quant_block,
    runtime_modules,
)
from fmtconv.convert.naming import module_pattern, natural_key
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import Checkpoint


# Default SQNR floor (dB) per output kind: what Gaussian weights measure with kernels_ref
# (affine group 64 / the mx modes / bfloat16 rounding) minus about 7 dB, so only real outliers show.
DEFAULT_MIN_SQNR_DB = {
    ("affine", 2): 1.0, ("affine", 3): 7.0, ("affine", 4): 13.0, ("affine", 5): 19.0, ("affine", 6): 25.0,
    ("affine", 8): 33.0, ("mxfp4", 4): 11.0, ("nvfp4", 4): 12.0, ("mxfp8", 8): 24.0, ("dense", 16): 40.0,
    ("dense", 32): 60.0,
}


# ---------------------------------------------------------------------------------------------
# Quality against the source
# ---------------------------------------------------------------------------------------------

# Rows [start, stop) of the source's float32 values for one output tensor, flattened to 2-D
# (all axes but the last), the same convention as `Codec.decode(..., rows=(start, stop))`.
SourceRows = Callable[[int, int], np.ndarray]


class ErrorStats:
    """Streaming SQNR and max abs error of `test` against `ref`, accumulated in float64."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0
        self.max_abs = 0.0
        self.count = 0
        self.nonfinite = 0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).reshape(-1)
        d = np.asarray(test, dtype=np.float64).reshape(-1) - r
        signal, noise = float(np.dot(r, r)), float(np.dot(d, d))
        if not math.isfinite(signal + noise):  # rare: count and drop the non-finite values
            fin = np.isfinite(d)
            self.nonfinite += int(d.size - np.count_nonzero(fin))
            self.count += int(d.size)
            r, d = r[fin], d[fin]
            signal, noise = float(np.dot(r, r)), float(np.dot(d, d))
        else:
            self.count += int(d.size)
        self.signal += signal
        self.noise += noise
        if d.size:
            self.max_abs = max(self.max_abs, float(d.max()), -float(d.min()))

    @property
    def sqnr_db(self) -> float:
        """10·log10(Σref² / Σ(test−ref)²); +inf when identical, nan when any value was non-finite."""
        if self.nonfinite:
            return math.nan
        if self.noise == 0:
            return math.inf
        if self.signal == 0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of `test` against `ref` in dB (+inf when identical)."""
    s = ErrorStats()
    s.update(ref, test)
    return s.sqnr_db


def max_abs_error(ref: np.ndarray, test: np.ndarray) -> float:
    s = ErrorStats()
    s.update(ref, test)
    return s.max_abs


@dataclass
class TensorQuality:
    """One compared output tensor."""

    name: str
    pattern: str
    kind: str  # "4-bit affine", "mxfp4", "bfloat16", ...
    numel: int
    sqnr_db: float
    max_abs_error: float
    threshold_db: float | None

    @property
    def outlier(self) -> bool:
        return math.isnan(self.sqnr_db) or (self.threshold_db is not None and self.sqnr_db < self.threshold_db)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["sqnr_db"] = json_float(self.sqnr_db)
        d["threshold_db"] = json_float(self.threshold_db) if self.threshold_db is not None else None
        d["outlier"] = self.outlier
        return d


def json_float(x: float) -> float | str:
    """JSON has no inf/nan: keep finite numbers (rounded), spell the rest out."""
    return round(x, 3) if math.isfinite(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else "nan")


class OutputReader:
    """Row blocks of a bundle's output tensors as float32, dequantized with the reference kernels."""

    def __init__(self, bundle: Bundle):
        self.b = bundle
        self.default, self.overrides, _ = quant_block(bundle.config)
        self.to_runtime = runtime_modules(bundle.config)

    def module_of(self, name: str) -> tuple[str, QuantParams] | None:
        """(P, params) when `name` is P.weight of a quantized module."""
        if not name.endswith(".weight"):
            return None
        p = name[: -len(".weight")]
        q = self.overrides.get(self.to_runtime(p), self.default)
        if f"{p}.scales" in self.b.tensors and isinstance(q, QuantParams):
            return p, q
        return None

    def shape2d(self, name: str) -> tuple[int, int]:
        """(rows, cols) of the logical (dequantized) tensor flattened to 2-D."""
        m = self.module_of(name)
        info = self.b.tensors[name]
        if m is not None:
            s = self.b.tensors[f"{m[0]}.scales"]
            cols = s.shape[-1] * m[1].group_size
        else:
            if info.dtype not in FLOAT_DTYPES:
                raise FmtconvError(f"dtype {info.dtype} is neither a float nor a quantized weight", file=info.file, tensor=name)
            cols = info.shape[-1] if info.shape else 1
        rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        return rows, cols

    def kind(self, name: str) -> tuple[str, tuple[str, int]]:
        m = self.module_of(name)
        if m is not None:
            q = m[1]
            return (f"{q.bits}-bit affine" if q.mode == "affine" else q.mode), (q.mode, q.bits)
        dt = self.b.tensors[name].dtype
        return DTYPE_NAMES[dt], ("dense", 32 if dt == "F32" else 16)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """float32 (stop-start, cols) of the output as the runtime would see it."""
        from fmtconv.kernels_ref import affine_dequantize, fp_dequantize

        m = self.module_of(name)
        if m is None:
            a = self.b.array(name)
            return _float32(a.reshape(-1, a.shape[-1] if a.ndim else 1)[start:stop])
        p, q = m
        w = self.b.array(f"{p}.weight")
        s = self.b.array(f"{p}.scales")
        w2, s2 = w.reshape(-1, w.shape[-1])[start:stop], s.reshape(-1, s.shape[-1])[start:stop]
        if q.mode == "affine":
            bi = self.b.array(f"{p}.biases").reshape(-1, s.shape[-1])[start:stop]
            out = affine_dequantize(w2, s2, bi, q.group_size, q.bits, backend="cpu", name=p)
        elif f"{p}.global_scale" in self.b.tensors:
            out = self._with_global_scale(p, q, w2, s2, start, stop, fp_dequantize)
        else:
            out = fp_dequantize(w2, s2, q.mode, dtype=np.float32, backend="cpu", name=p)
        return np.asarray(out, dtype=np.float32)

    def _with_global_scale(self, p, q, w2, s2, start, stop, fp_dequantize) -> np.ndarray:
        """nvfp4 with a tensor scale per leading index (per expert for switch layers, mlx_lm switch_layers)."""
        g = np.asarray(self.b.array(f"{p}.global_scale"), dtype=np.float32).reshape(-1)
        rows_total = int(np.prod(self.b.tensors[f"{p}.weight"].shape[:-1], dtype=np.int64))
        per = rows_total // max(g.size, 1)
        out = np.empty((stop - start, s2.shape[-1] * q.group_size), dtype=np.float32)
        r = start
        while r < stop:
            k = r // per
            e = min(stop, (k + 1) * per)
            out[r - start : e - start] = fp_dequantize(w2[r - start : e - start], s2[r - start : e - start], q.mode,
                                                       dtype=np.float32, global_scale=float(g[k]), backend="cpu", name=p)
            r = e
        return out

    def release(self, name: str) -> None:
        m = self.module_of(name)
        names = [name] if m is None else [f"{m[0]}.{k}" for k in ("weight", "scales", "biases") if f"{m[0]}.{k}" in self.b.tensors]
        for n in names:
            self.b.release(n)


def compare_with_source(
    out_dir: str | Path | Bundle,
    source_dir: str | Path | None = None,
    pairs: Iterable[tuple[str, SourceRows]] | None = None,
    *,
    threshold_db: float | None = None,
) -> tuple[list[TensorQuality], list[str]]:
    """SQNR and max abs error of each output tensor against its source values, streamed in row blocks.

    pairs: (output tensor name, fn(start, stop) -> float32 source rows); for a quantized module
    the output name is `P.weight`.  Without pairs, every output tensor whose name is also a
    dense float tensor of the source with the same logical shape is compared (`same_name_pairs`).
    threshold_db: SQNR floor for outliers; None uses DEFAULT_MIN_SQNR_DB per output kind.
    Returns (rows, problems); problems name tensors that could not be compared or went non-finite.
    """
    b = out_dir if isinstance(out_dir, Bundle) else open_bundle(out_dir)
    reader = OutputReader(b)
    src_ck = None
    problems: list[str] = []
    try:
        if pairs is None:
            if source_dir is None:
                raise FmtconvError("compare_with_source needs pairs or a source directory")
            src_ck = Checkpoint(source_dir)
            pairs = same_name_pairs(b, src_ck)
        rows = []
        for name, fn in pairs:
            if name not in b.tensors:
                problems.append(f"{name}: output tensor to compare is not in the bundle")
                continue
            try:
                rows.append(_compare_one(reader, name, fn, threshold_db))
            except FmtconvError as e:
                problems.append(f"{name}: not compared ({e})")
            finally:
                reader.release(name)
                if src_ck is not None and name in src_ck.tensors:
                    src_ck.release(name)
    finally:
        if src_ck is not None:
            src_ck.close()
        if not isinstance(out_dir, Bundle):
            b.close()
    problems += [f"{r.name}: non-finite values after dequantize where the source is finite" for r in rows if math.isnan(r.sqnr_db)]
    return rows, problems


def _compare_one(reader: OutputReader, name: str, fn: SourceRows, threshold_db: float | None) -> TensorQuality:
    n_rows, cols = reader.shape2d(name)
    step = max(1, ROW_BLOCK_ELEMENTS // max(cols, 1))
    stats = ErrorStats()
    for a in range(0, n_rows, step):
        z = min(n_rows, a + step)
        ref = np.asarray(fn(a, z), dtype=np.float32)
        if ref.size != (z - a) * cols:
            raise FmtconvError(f"source rows [{a}, {z}) have shape {list(ref.shape)}, expected {[z - a, cols]}", tensor=name)
        stats.update(ref.reshape(z - a, cols), reader.rows(name, a, z))
    label, key = reader.kind(name)
    thr = threshold_db if threshold_db is not None else DEFAULT_MIN_SQNR_DB.get(key)
    pattern = module_pattern(name[: -len(".weight")] if reader.module_of(name) else name)
    return TensorQuality(name, pattern, label, n_rows * cols, stats.sqnr_db, stats.max_abs, thr)


def _float32(a: np.ndarray) -> np.ndarray:
    from fmtconv.kernels_ref.affine import to_float32  # exact, and fast for bfloat16

    return to_float32(np.ascontiguousarray(a))


def rows_of(array: np.ndarray) -> SourceRows:
    """A SourceRows over an in-memory array (flattened to 2-D)."""
    a2 = np.asarray(array).reshape(-1, array.shape[-1] if array.ndim else 1)
    return lambda start, stop: np.asarray(a2[start:stop], dtype=np.float32)


def same_name_pairs(b: Bundle, source: Checkpoint) -> list[tuple[str, SourceRows]]:
    """Output tensors (P.weight of quantized modules, dense float tensors) with a same-name, same-shape dense source tensor."""
    reader = OutputReader(b)
    out = []
    for name in sorted(b.tensors):
        if name.endswith((".scales", ".biases", ".global_scale")) and name.rsplit(".", 1)[0] + ".weight" in b.tensors:
            continue
        info = source.tensors.get(name)
        if info is None or info.dtype not in FLOAT_DTYPES:
            continue
        try:
            shape2d = reader.shape2d(name)
        except FmtconvError:
            continue
        src_rows = int(np.prod(info.shape[:-1], dtype=np.int64)) if len(info.shape) > 1 else 1
        if (src_rows, info.shape[-1] if info.shape else 1) != shape2d:
            continue
        out.append((name, _checkpoint_rows(source, name)))
    return out


def _checkpoint_rows(ck: Checkpoint, name: str) -> SourceRows:
    def fn(start: int, stop: int) -> np.ndarray:
        a = ck.array(name)
        return _float32(a.reshape(-1, a.shape[-1] if a.ndim else 1)[start:stop])

    return fn


def summarize(rows: Iterable[TensorQuality]) -> list[dict[str, Any]]:
    """Per module pattern and kind: count, min / median SQNR (dB), worst max abs error, outliers."""
    groups: dict[tuple[str, str], list[TensorQuality]] = {}
    for r in rows:
        groups.setdefault((r.pattern, r.kind), []).append(r)
    out = []
    for (pattern, kind), rs in sorted(groups.items(), key=lambda kv: natural_key(kv[0][0])):
        vals = [r.sqnr_db for r in rs]
        out.append({"pattern": pattern, "kind": kind, "count": len(rs),
                    "min_sqnr_db": min(vals), "median_sqnr_db": statistics.median(vals),
                    "max_abs_error": max(r.max_abs_error for r in rs), "outliers": sum(r.outlier for r in rs)})
    return out

