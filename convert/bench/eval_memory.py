"""`fmtconv bench eval`: the streamed evaluation's and the `--fit` sensitivity pass's peak memory do not grow with depth.

Two synthetic DeepSeek-V3-style FP8 checkpoints of the same width (bench.data's generator), one with few decoder
layers and one with four times as many, are converted with q4q8 and evaluated, and their sensitivities measured, each
run in a child process of its own; the report compares the children's peak RSS (VmHWM).  The same evaluation holding
both whole models (`direct`) runs beside them, to show what streaming saves at that depth.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from fmtconv.convert.bench.data import DEFAULT_DIR, generate_v3_checkpoint
from fmtconv.convert.process import python_child

# Width of the synthetic layers: one decoder layer decodes to ~100 MB of float32 teacher weights (mlx[cpu]'s reference
# BLAS on Linux takes seconds per matmul at larger widths, so the layers are narrow and many experts wide).
SHAPE = {"hidden": 512, "moe_inter": 512, "experts": 32, "vocab": 4096, "q_lora": 256, "kv_lora": 128}
TARGET = 0.10  # peak RSS of the deep run at most 10 % above the shallow one


# The sensitivity run's candidates (a few, to keep its time down: its memory does not depend on how many).
SENSITIVITY_CANDIDATES = "(Candidate('affine', 4, 64, 'minmax'), Candidate('affine', 8, 64, 'minmax'))"


def _child(bundle: Path, source: Path, n_tokens: int, mode: str) -> dict[str, Any]:
    code = textwrap.dedent(f"""
        import json, tempfile, time
        from pathlib import Path
        from fmtconv.convert.api import eval_tokens
        from fmtconv.convert.check.eval import evaluate, evaluate_direct
        from fmtconv.convert.fit.allocate import fit_recipe
        from fmtconv.convert.fit.candidates import Candidate
        from fmtconv.convert.process import peak_rss_bytes
        batch = eval_tokens({str(source)!r}, [{str(source)!r}], n_tokens={n_tokens}, seq_len={n_tokens})
        t0 = time.perf_counter()
        if {mode!r} == "sensitivity":
            with tempfile.TemporaryDirectory() as cache:
                r = fit_recipe(Path({str(source)!r}), 10**15, tokens=batch, cache_dir=cache, candidates={SENSITIVITY_CANDIDATES})
            kl = r.predicted_kl
        else:
            run = evaluate_direct if {mode!r} == "direct" else evaluate
            kl = run(Path({str(bundle)!r}), Path({str(source)!r}), batch).metrics["kl_mean"]
        print(json.dumps({{"peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "kl_mean": kl, "seconds": time.perf_counter() - t0}}))
    """)
    proc = subprocess.run(python_child("-c", code), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"eval child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_eval_bench(root: Path | None = None, layers: tuple[int, int] = (4, 16), n_tokens: int = 128,
                   quiet: bool = False) -> dict[str, Any]:
    from fmtconv.convert.api import convert

    root = Path(root) if root is not None else DEFAULT_DIR
    report: dict[str, Any] = {"shape": SHAPE, "n_tokens": n_tokens, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fmtconv-bench-eval-") as tmp:
        for n in layers:
            src = generate_v3_checkpoint(root, 0, quiet=quiet, layers=n, **SHAPE)
            out = Path(tmp) / f"{n}-layers"
            convert(src, out, recipe="q4q8", kernel_backend="cpu")
            for mode in ("streamed", "direct", "sensitivity"):
                if not quiet:
                    print(f"eval, {n} layers, {mode} ...", file=sys.stderr)
                report["runs"][f"{n}_layers_{mode}"] = {"layers": n, "mode": mode, "source_bytes": _bytes(src),
                                                        **_child(out, src, n_tokens, mode)}
    report["targets"] = {}
    for mode in ("streamed", "sensitivity"):
        a, b = (report["runs"][f"{n}_layers_{mode}"]["peak_rss_mb"] for n in layers)
        report[f"{mode}_rss_ratio"] = round(b / a, 3)
        report["targets"][f"{mode}: peak RSS of {layers[1]} layers within {TARGET:.0%} of {layers[0]} layers"] = abs(b / a - 1) <= TARGET
    return report


def _bytes(src: Path) -> int:
    return sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))


def print_eval_bench(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2))
        return
    print("| layers | mode | source GB | peak RSS MB | seconds | KL mean (sensitivity: predicted) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in report["runs"].values():
        print(f"| {r['layers']} | {r['mode']} | {r['source_bytes'] / 1e9:.2f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.1f} | "
              f"{r['kl_mean']:.5f} |")
    print(f"\npeak RSS ratio, streamed eval {report['streamed_rss_ratio']:.3f}, sensitivity pass "
          f"{report['sensitivity_rss_ratio']:.3f}")
    for name, ok in report["targets"].items():
        print(f"  {name}: {'met' if ok else 'NOT met'}")
