"""An evaluation's report: the JSON keys `fmtconv eval --json` prints, the table it prints otherwise, and the file a
bundle keeps it in (its model card summarises that file)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVAL_FILE = "fmtconv-eval.json"  # in the bundle, beside config.json


@dataclass
class EvalReport:
    bundle: str
    source: str
    runtime: str
    model_module: str
    tokens_source: str
    sequences: int
    teacher_dtype: str
    student_dtype: str
    metrics: dict[str, Any]
    layers: list[dict[str, Any]] = field(default_factory=list)
    worst_layers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    embedding_rel_error: float | None = None
    head_rel_error: float | None = None
    notes: list[str] = field(default_factory=list)
    peak_rss_mb: float | None = None
    seconds: float = 0.0
    mode: str = "streamed"
    teacher_logits: Any = field(default=None, repr=False)  # [sequences, positions, vocab] float32, not in the JSON

    def to_json(self) -> dict[str, Any]:
        return {**_finite(self.metrics), "layers": _finite(self.layers), "worst_layers": _finite(self.worst_layers),
                "embedding_rel_error": _finite(self.embedding_rel_error), "head_rel_error": _finite(self.head_rel_error),
                "peak_rss_mb": self.peak_rss_mb, "bundle": self.bundle, "source": self.source, "runtime": self.runtime,
                "model_module": self.model_module, "tokens_source": self.tokens_source, "sequences": self.sequences,
                "teacher_dtype": self.teacher_dtype, "student_dtype": self.student_dtype, "mode": self.mode,
                "notes": self.notes, "seconds": round(self.seconds, 2)}


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def write_report(bundle: Path, report: EvalReport) -> Path:
    """The report as JSON in the bundle (written to a temporary name, then renamed)."""
    path = Path(bundle) / EVAL_FILE
    tmp = path.with_name(EVAL_FILE + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_report(bundle: Path) -> dict[str, Any] | None:
    path = Path(bundle) / EVAL_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def report_text(r: dict[str, Any]) -> str:
    """A plain-text table of a report's JSON."""
    f = lambda x, d=4: f"{x:.{d}f}" if isinstance(x, (int, float)) else str(x)  # noqa: E731
    lines = [f"{r['bundle']} against {r['source']} ({r['runtime']}: {r['model_module']}), {r['tokens']} tokens in "
             f"{r['sequences']} sequence(s): {r['tokens_source']}",
             f"teacher {r['teacher_dtype']}, student {r['student_dtype']} ({r['mode']}); {r['seconds']} s, peak RSS "
             f"{r['peak_rss_mb']} MB", "",
             f"KL(teacher || student), nats per token: mean {f(r['kl_mean'], 5)}  p50 {f(r['kl_p50'], 5)}  p95 "
             f"{f(r['kl_p95'], 5)}  p99 {f(r['kl_p99'], 5)}  max {f(r['kl_max'], 5)}",
             f"top-1 agreement {f(r['top1'])}  top-5 (teacher's top-1 in the student's top 5) {f(r['top5'])}",
             f"perplexity: teacher {f(r['ppl_teacher'], 3)}  student {f(r['ppl_student'], 3)}"]
    lines += [f"note: {n}" for n in r.get("notes", [])]
    if r.get("layers"):
        classes = sorted({c for row in r["layers"] for c in row.get("classes", {})})
        lines += ["", "Per decoder layer, relative output error with the teacher's input (the layer's own quantization):",
                  "  layer  " + "  ".join(f"{c[:14]:>14s}" for c in ["whole layer", *classes])]
        for row in r["layers"]:
            cells = [row["rel_error"], *(row.get("classes", {}).get(c, "") for c in classes)]
            lines.append(f"  {row['layer']:5d}  " + "  ".join(f"{f(v):>14s}" if v != "" else f"{'':>14s}" for v in cells))
        for name in ("embedding", "head"):
            if r.get(f"{name}_rel_error") is not None:
                lines.append(f"  {name}: {f(r[f'{name}_rel_error'])}")
        lines += ["", "Largest per module class (layer: error):"]
        for cls, worst in r.get("worst_layers", {}).items():
            lines.append(f"  {cls:16s} " + ", ".join(f"{w['layer']}: {f(w['rel_error'])}" for w in worst))
    return "\n".join(lines)
