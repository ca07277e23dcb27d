"""Verify an MLX bundle: its structure (`check.structure`) and, against its source, its weight quality (`check.weight_quality`).

`verify_bundle` never raises for a bad bundle: every fault is a line in `report.problems`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtconv.convert.bundle.reader import Bundle, ModuleEntry, QuantParams, bundle_modules, open_bundle, pattern_table, quant_block
from fmtconv.convert.check.structure import check_config, check_finite, check_modules
from fmtconv.convert.check.weight_quality import (
    DEFAULT_MIN_SQNR_DB,
    ErrorStats,
    OutputReader,
    SourceRows,
    TensorQuality,
    compare_with_source,
    json_float,
    max_abs_error,
    rows_of,
    same_name_pairs,
    sqnr_db,
    summarize,
)
from fmtconv.errors import FmtconvError

# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    bundle: str
    source: str | None
    problems: list[str]
    modules: list[ModuleEntry]
    quality: list[TensorQuality] = field(default_factory=list)
    provenance: dict[str, Any] | None = None
    encoders: list[dict[str, Any]] | None = None  # --compare-encoders: encoder_compare.compare_encoders rows

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def outliers(self) -> list[TensorQuality]:
        return [r for r in self.quality if r.outlier]

    def summary(self) -> list[dict[str, Any]]:
        return summarize(self.quality)

    def summary_json(self) -> dict[str, Any]:
        """The compact form the model card shows: ok, counts, per-pattern SQNR, outliers."""
        return {
            "ok": self.ok,
            "problems": len(self.problems),
            "modules": len([m for m in self.modules if m.quantized]),
            "tensors": len(self.modules),
            "compared": len(self.quality),
            "patterns": [{**s, "min_sqnr_db": json_float(s["min_sqnr_db"]), "median_sqnr_db": json_float(s["median_sqnr_db"]),
                          "max_abs_error": json_float(s["max_abs_error"])} for s in self.summary()],
            "outliers": [r.name for r in self.outliers],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "source": self.source,
            "ok": self.ok,
            "problems": self.problems,
            "provenance": self.provenance,
            "modules": pattern_table(self.modules),
            "summary": self.summary_json(),
            "tensors": [r.to_json() for r in self.quality],
            **({"encoders": self.encoders} if self.encoders is not None else {}),
        }

    def to_text(self) -> str:
        """Human-readable report for the CLI."""
        lines = [f"bundle {self.bundle}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        lines += [f"  problem: {p}" for p in self.problems]
        n_q = sum(m.quantized for m in self.modules)
        lines.append(f"  {len(self.modules)} weights, {n_q} quantized")
        if self.quality:
            lines.append(f"  against {self.source}: {len(self.quality)} tensors compared")
            lines.append(f"  {'pattern':60s} {'kind':14s} {'n':>5s} {'min dB':>8s} {'median dB':>10s} {'max |err|':>10s}")
            for s in self.summary():
                lines.append(f"  {s['pattern']:60s} {s['kind']:14s} {s['count']:5d} {s['min_sqnr_db']:8.2f} "
                             f"{s['median_sqnr_db']:10.2f} {s['max_abs_error']:10.3g}")
            for r in self.outliers:
                lines.append(f"  outlier: {r.name} {r.sqnr_db:.2f} dB < {r.threshold_db} dB ({r.kind})")
        if self.encoders is not None:
            from fmtconv.convert.check.encoder_compare import encoder_table_text

            lines.append("  affine encoders re-run on the source (SQNR per module pattern, MLX CPU dequantize):")
            lines += encoder_table_text(self.encoders)
        return "\n".join(lines)


def verify_bundle(
    out_dir: str | Path,
    source: str | Path | None = None,
    *,
    pairs: Iterable[tuple[str, SourceRows]] | None = None,
    threshold_db: float | None = None,
) -> VerifyReport:
    """Check a bundle's structure; with `source` (or `pairs`) also report SQNR per output tensor.

    pairs: as in `compare_with_source` (the converter builds them from its plan); when only
    `source` is given, same-name dense source tensors are compared.  Never raises for a bad
    bundle: every fault is a line in `report.problems`.
    """
    b = open_bundle(out_dir)
    try:
        problems = list(b.problems)
        if b.config is not None:
            problems += check_config(b)
            problems += check_modules(b)
            problems += check_finite(b)
        report = VerifyReport(str(out_dir), str(source) if source is not None else None, problems,
                              bundle_modules(b.config, b.tensors), provenance=(b.config or {}).get("fmtconv"))
        if (source is not None or pairs is not None) and b.config is not None:
            try:
                rows, qp = compare_with_source(b, source, pairs, threshold_db=threshold_db)
            except FmtconvError as e:
                rows, qp = [], [f"source: {e}"]
            report.quality = rows
            report.problems += qp
        return report
    finally:
        b.close()

__all__ = [
    "Bundle",
    "DEFAULT_MIN_SQNR_DB",
    "ErrorStats",
    "ModuleEntry",
    "OutputReader",
    "QuantParams",
    "SourceRows",
    "TensorQuality",
    "VerifyReport",
    "bundle_modules",
    "compare_with_source",
    "max_abs_error",
    "open_bundle",
    "pattern_table",
    "quant_block",
    "rows_of",
    "same_name_pairs",
    "sqnr_db",
    "summarize",
    "verify_bundle",
]
