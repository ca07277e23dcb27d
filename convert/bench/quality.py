"""`fmtconv bench quality`: bundles of each source × recipe × encoder, each evaluated against its source with
`fmtconv eval` (the same tokens for all), in one table: size, bits per weight, KL, top-1, and the module classes a
recipe leaves at 3 bits or fewer."""

from __future__ import annotations

import json
import math
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fmtconv.convert.api import convert, eval_tokens, evaluate, plan
from fmtconv.convert.naming import module_class
from fmtconv.convert.recipes import PRESETS

LOW_BITS = 3


def low_bit_classes(p: Any) -> dict[str, int]:
    """Module class -> the fewest bits a plan gives any of its modules, for classes at LOW_BITS or fewer."""
    fewest: dict[str, int] = {}
    for t in p.tensors:
        if t.quantized:
            cls = module_class(t.runtime_module)
            fewest[cls] = min(fewest.get(cls, 99), int(t.bits))
    return {c: b for c, b in sorted(fewest.items()) if b <= LOW_BITS}


def run_quality_bench(sources: Iterable[str | Path], recipes: Iterable[str], encoders: Iterable[str], *,
                      n_tokens: int = 512, seq_len: int = 512, kernel_backend: str = "metal",
                      student_float32: bool = False) -> list[dict[str, Any]]:
    rows = []
    recipes = list(PRESETS) if list(recipes) == ["all"] else list(recipes)
    with tempfile.TemporaryDirectory(prefix="fmtconv-bench-quality-") as tmp:
        for src in map(Path, sources):
            batch = eval_tokens(src, [src], n_tokens=n_tokens, seq_len=seq_len)
            for recipe in recipes:
                p = plan(src, recipe, kernel_backend=kernel_backend)
                for enc in encoders:
                    out = Path(tmp) / f"{src.name}-{recipe}-{enc}"
                    convert(src, out, recipe=recipe, kernel_backend=kernel_backend, encoder=enc)
                    r = evaluate(out, src, batch=batch, student_float32=student_float32, record=False)
                    rows.append({"source": src.name, "recipe": recipe, "encoder": enc, "bytes": p.total_bytes,
                                 "bits_per_weight": round(p.bits_per_weight, 3), "kl_mean": r.metrics["kl_mean"],
                                 "kl_p99": r.metrics["kl_p99"], "top1": r.metrics["top1"], "tokens": r.metrics["tokens"],
                                 "tokens_source": r.tokens_source, "student_dtype": r.student_dtype,
                                 "low_bit_classes": low_bit_classes(p)})
    return rows


def encoder_gains(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per source and recipe: mse's KL over minmax's (below 1: mse is better)."""
    by: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        by[(r["source"], r["recipe"])][r["encoder"]] = r["kl_mean"]
    return [{"source": s, "recipe": rc, "kl_ratio_mse_over_minmax": v["mse"] / v["minmax"]}
            for (s, rc), v in by.items() if "mse" in v and "minmax" in v and v["minmax"] > 0]


def quality_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| source | recipe | encoder | bits/weight | KL mean | KL p99 | top-1 | classes at <= 3 bits |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        low = ", ".join(f"{c} {b}" for c, b in r["low_bit_classes"].items()) or "none"
        lines.append(f"| {r['source']} | {r['recipe']} | {r['encoder']} | {r['bits_per_weight']:.3f} | {r['kl_mean']:.5f} | "
                     f"{r['kl_p99']:.5f} | {r['top1']:.3f} | {low} |")
    gains = encoder_gains(rows)
    if gains:
        lines += ["", "| source | recipe | KL mse / minmax |", "|---|---|---:|"]
        lines += [f"| {g['source']} | {g['recipe']} | {g['kl_ratio_mse_over_minmax']:.3f} |" for g in gains]
        ratios = [g["kl_ratio_mse_over_minmax"] for g in gains]
        lines.append(f"\ngeometric mean of KL mse / minmax: {math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f} "
                     f"over {len(ratios)} source x recipe pairs; mse lower in {sum(r < 1 for r in ratios)} of them")
    if rows:
        lines.append(f"tokens: {rows[0]['tokens']} per run ({rows[0]['tokens_source']}); student activations "
                     f"{rows[0]['student_dtype']}")
    return "\n".join(lines)


def print_quality(rows: list[dict[str, Any]], as_json: bool) -> None:
    print(json.dumps({"rows": rows, "encoder_gains": encoder_gains(rows)}, indent=2) if as_json else quality_table(rows))
