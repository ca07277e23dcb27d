"""`fmtconv bench fit`: for each source and preset P, the bundle `--fit bytes(P)` writes against P's own bundle, both
evaluated with `fmtconv eval` on the same tokens: size, KL and their ratio, and the geometric mean over everything.

The evaluation tokens are held out: the sensitivity pass measures on the first N tokens of the calibration stream,
both bundles are judged on the N after them, so the fit is not scored on the data it was allocated from."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fmtconv.convert.api import calibration_and_held_out, convert, evaluate, plan

PRESETS = ("q4q8", "mixed_3_6", "mixed_2_6")
TARGET_RATIO = 0.8  # geometric mean of kl_mean(fit) / kl_mean(P) at most this, and every ratio at most 1


def run_fit_bench(sources: Iterable[str | Path], presets: Iterable[str] = PRESETS, *, n_tokens: int = 2048,
                  seq_len: int = 512, kernel_backend: str = "metal", cache_dir: str | Path | None = None) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="fmtconv-bench-fit-") as tmp:
        for src in map(Path, sources):
            batch, held_out = calibration_and_held_out(src, n_tokens, seq_len)
            for preset in presets:
                print(f"bench fit: {src.name}, {preset} and --fit at its size", file=sys.stderr, flush=True)
                budget = plan(src, preset, kernel_backend=kernel_backend).total_bytes
                out_p, out_f = Path(tmp) / f"{src.name}-{preset}", Path(tmp) / f"{src.name}-{preset}-fit"
                convert(src, out_p, recipe=preset, kernel_backend=kernel_backend)
                s = convert(src, out_f, recipe=None, fit=budget, fit_tokens=batch, fit_cache=cache_dir, kernel_backend=kernel_backend)
                kp = evaluate(out_p, src, batch=held_out, record=False).metrics
                kf = evaluate(out_f, src, batch=held_out, record=False).metrics
                fit = json.loads((out_f / "config.json").read_text())["fmtconv"]["fit"]
                rows.append({"source": src.name, "preset": preset, "budget_bytes": budget, "fit_bytes": s["bytes_out"],
                             "kl_preset": kp["kl_mean"], "kl_fit": kf["kl_mean"], "predicted_kl_fit": fit["predicted_kl"],
                             "top1_preset": kp["top1"], "top1_fit": kf["top1"], "ratio": kf["kl_mean"] / kp["kl_mean"],
                             "tokens_source": held_out.source})
    ratios = [r["ratio"] for r in rows]
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else math.nan
    return {"rows": rows, "geomean_ratio": geo, "worst_ratio": max(ratios, default=math.nan), "tokens": n_tokens,
            "targets": {"every ratio <= 1": all(r <= 1 for r in ratios), f"geomean <= {TARGET_RATIO}": geo <= TARGET_RATIO,
                        "every fit within its budget": all(r["fit_bytes"] <= r["budget_bytes"] for r in rows)}}


def print_fit_bench(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print("| source | preset | bytes (preset = budget) | bytes (fit) | KL preset | KL fit | predicted | ratio | top-1 preset -> fit |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in report["rows"]:
        print(f"| {r['source']} | {r['preset']} | {r['budget_bytes']:,} | {r['fit_bytes']:,} | {r['kl_preset']:.5f} | "
              f"{r['kl_fit']:.5f} | {r['predicted_kl_fit']:.5f} | {r['ratio']:.3f} | {r['top1_preset']:.3f} -> {r['top1_fit']:.3f} |")
    print(f"\ngeometric mean of KL fit / preset: {report['geomean_ratio']:.3f}; worst {report['worst_ratio']:.3f}; "
          f"{report['tokens']} tokens per evaluation, held out from the sensitivity pass's")
    for name, ok in report["targets"].items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")
