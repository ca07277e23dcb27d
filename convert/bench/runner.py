"""`fmtconv bench`: fmtconv next to the usual pipeline, a plain copy and mlx_lm.convert, on synthetic checkpoints.

For each requested size (default 4 GB; e.g. `--size 4GB --size 8GB` for the scaling check) it generates or
reuses a DeepSeek-V4-shaped checkpoint and a DeepSeek-V3-style FP8 one of that size (convert/bench/data.py)
and runs, each phase in a child process (convert/bench/phases.py):

  fmtconv           `fmtconv convert V4 OUT --recipe q4q8 --kernel-backend cpu`, all cores
  fmtconv_metal     the same with `--kernel-backend metal` (the GPU arithmetic, computed on the CPU)
  usual             the usual pipeline on V4 (dequantize to bfloat16, mx.quantize, save)
  copy              read the V4 source, write as many bytes as fmtconv writes, fsync: the disk's speed
  threads           `fmtconv convert V4 ...` pinned to 1, 2 (and all) cores, output on tmpfs where there is
                    room (so the compute shows, not the shared disk): throughput per core count
  v3                `fmtconv fp8-to-affine V3 OUT --bits 4 --other-bits 4 --kernel-backend cpu` next to
                    `mlx_lm.convert --hf-path V3 --mlx-path OUT -q --q-bits 4`; same settings, bytes compared

(`--repeat N`: the disk-sensitive phases fmtconv, copy, fmtconv_metal and v3_fmtconv N times, interleaved,
each reporting its median run; `--cold`: the source's pages dropped from the page cache before every phase, so
no phase reads what an earlier one left cached) and reports wall time, Mparam/s, MB/s (in + out), peak RSS, CPU seconds, the seconds the machine stalled on
CPU and on I/O meanwhile (Linux PSI) and the exact command of each phase, the ratios the speed issue sets
targets for, whether bytes are identical, the load average before and after, and, with two sizes, how time
and peak RSS scale.  `--json` prints all of it.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from fmtconv.convert.bench.data import DEFAULT_DIR, generate_checkpoint, generate_v3_checkpoint
from fmtconv.convert.bench.phases import evict_page_cache, fmtconv_command, mlx_lm_command, run_phase_in_child, same_tensors

PHASES = ("fmtconv", "fmtconv_metal", "usual", "copy", "threads", "v3")
PHASES_ALL = (*PHASES, "mse")  # mse: the fmtconv phase with --encoder mse (not run by default)
V4_RECIPE = "q4q8"
V3_BITS = 4
# (name, report key, comparison, threshold): the speed issue's targets, checked on every run
TARGETS = (
    ("fmtconv/copy, cpu arithmetic", "ratio_fmtconv_over_copy", ">=", 0.8),
    ("fmtconv/copy, metal arithmetic", "ratio_fmtconv_metal_over_copy", ">=", 0.8),
    ("fmtconv vs the usual pipeline", "ratio_fmtconv_over_usual", ">=", 10.0),
    ("fmtconv vs mlx_lm.convert (V3 FP8)", "ratio_v3_fmtconv_over_mlx_lm", ">=", 5.0),
    ("V3 bytes identical to mlx_lm.convert", "v3_bytes_identical", "==", True),
    ("peak RSS of fmtconv, MB", "fmtconv_peak_rss_mb", "<=", 1500.0),
    ("first fmtconv run (compiling) / median of the later ones", "ratio_first_run_over_later", "<=", 1.1),
)
# With two sizes: each fmtconv phase's time ratio over the size ratio, within 10 % of 1.
SCALING_TOLERANCE = 0.1


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("fmtconv", "numpy", "numba", "mlx", "mlx-lm"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _cpus() -> int:
    from fmtconv.convert.pipeline import available_cpus

    return available_cpus()


def _figures(r: dict[str, Any], params: int, bytes_in: int) -> dict[str, Any]:
    wall = r["wall_s"]
    out = {
        "wall_s": round(wall, 3),
        "params_per_s": round(params / wall, 1),
        "mb_per_s": round((bytes_in + r["bytes_out"]) / 1e6 / wall, 1),
        "mb_per_s_in": round(bytes_in / 1e6 / wall, 1),
        "bytes_out": r["bytes_out"],
        "peak_rss_mb": round(r["peak_rss_bytes"] / 1e6, 1),
        # CPU seconds of the child (user + system, interpreter start included): cpu_s / wall_s near the core
        # count means compute-bound, far below it means waiting (for the disk, or for CPUs others hold); the
        # system seconds are the kernel's work for the phase (page faults, copies into the page cache, syscalls)
        "cpu_s": round(r["cpu_s"], 2),
        "cpu_user_s": round(r["cpu_user_s"], 2),
        "cpu_sys_s": round(r["cpu_sys_s"], 2),
    }
    for key in ("stall_s", "kernels"):
        if key in r:
            out[key] = r[key]
    return out


def _ok(results: dict[str, Any], *names: str) -> bool:
    """Whether every named phase ran to the end."""
    return all(n in results and "wall_s" in results[n] for n in names)


def _ratio(report: dict[str, Any], key: str, slow: str, fast: str) -> None:
    ph = report["phases"]
    if _ok(ph, slow, fast):
        report[key] = round(ph[slow]["wall_s"] / ph[fast]["wall_s"], 3)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median wall time (the lower middle one for an even count), with every run's wall listed."""
    done = [r for r in runs if "wall_s" in r]
    if not done:
        return runs[0]
    pick = sorted(done, key=lambda r: r["wall_s"])[(len(done) - 1) // 2]
    return {**pick, "repeats_wall_s": [r.get("wall_s") for r in runs]} if len(runs) > 1 else pick


def first_run(report: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """The first fmtconv run against the median of the later ones: after a fresh install, the first run is the one
    that compiles the kernels (its `kernels` record says which, and in how many seconds).  The target's ratio is set
    only when that run compiled something: otherwise the difference is the page cache's, not a fresh install's."""
    if len(runs) < 2 or not all("wall_s" in r for r in runs):
        return
    later = statistics.median(r["wall_s"] for r in runs[1:])
    compiled = {k: v for k, v in runs[0].get("kernels", {}).items() if v.get("compiled")}
    report["first_run"] = {"wall_s": runs[0]["wall_s"], "later_median_wall_s": round(later, 3), "compiled_kernels": sorted(compiled),
                           "compile_s": round(sum(v["seconds"] for v in compiled.values()), 3),
                           "ratio_over_later": round(runs[0]["wall_s"] / later, 3)}
    if compiled:
        report["ratio_first_run_over_later"] = report["first_run"]["ratio_over_later"]


def bench_one_size(root: Path, size_bytes: int, *, phases: tuple[str, ...], workers: int | None, keep: bool, quiet: bool,
                   repeat: int = 1, cold: bool = False, shape: dict[str, Any] | None = None,
                   v3_shape: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every selected phase at one size; the report for that size.  With repeat > 1 the disk-sensitive phases run
    that many times, interleaved (fmtconv, copy, fmtconv_metal, ...), and each reports its median run; with cold,
    the source's pages are dropped from the page cache before every phase."""
    from fmtconv.convert.api import plan as make_plan

    load_before = _load()
    src = generate_checkpoint(root, size_bytes, quiet=quiet, **(shape or {}))
    p = make_plan(src, V4_RECIPE, kernel_backend="cpu")
    params, bytes_in = p.total_params, p.source_bytes
    runs = root / "runs"
    results: dict[str, Any] = {}

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    def run(name: str, phase: str, kwargs: dict[str, Any], n_params: int, n_in: int, cores: int | None = None,
            command: list[str] | None = None, out: Path | None = None) -> Path:
        out = out or runs / name
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # an interrupted run would resume
        say(f"running {name} ...")
        if cold:
            evict_page_cache(Path(kwargs["src"]))
        try:
            r = run_phase_in_child(phase, {"out": str(out), **kwargs}, cores=cores)
        except RuntimeError as e:  # e.g. a peer killed for memory: recorded, the other phases still run
            results[name] = {"error": str(e), **({"command": " ".join(command)} if command else {})}
            return out
        results[name] = _figures(r, n_params, n_in)
        if cores:
            results[name]["cores"] = cores
            results[name]["pinned"] = r.get("pinned")
        if command:
            results[name]["command"] = " ".join(command)
        return out

    def v4_args(out_name: str, backend: str, encoder: str = "minmax") -> list[str]:
        args = ["convert", str(src), str(runs / out_name), "--recipe", V4_RECIPE, "--kernel-backend", backend, "--quiet", "--json"]
        args += ["--encoder", encoder] if encoder != "minmax" else []
        return args + (["--workers", str(workers)] if workers else [])

    def drop(*names: str) -> None:
        if not keep:
            for n in names:
                shutil.rmtree(runs / n, ignore_errors=True)

    report: dict[str, Any] = {"size_bytes_requested": size_bytes, "checkpoint": str(src), "source_bytes": bytes_in,
                              "output_bytes": p.total_bytes, "params": params, "recipe": V4_RECIPE, "kernel_backend": "cpu",
                              "cpus": _cpus(), "page_cache": "cold" if cold and hasattr(os, "posix_fadvise") else "warm"}
    identical: bool | None = None
    rounds: dict[str, list[dict[str, Any]]] = {}
    for i in range(repeat):
        tag = "" if i == 0 else f"#{i}"  # the first round's fmtconv output is kept for the byte comparisons
        for name, backend in (("fmtconv", "cpu"), ("copy", None), ("fmtconv_metal", "metal"), ("mse", "cpu")):
            if name not in phases:
                continue
            if backend is None:
                run(name + tag, "copy", {"src": str(src), "bytes_out": p.total_bytes}, params, bytes_in)
            else:
                a = v4_args(name + tag, backend, "mse" if name == "mse" else "minmax")
                run(name + tag, "fmtconv", {"src": str(src), "args": a}, params, bytes_in, command=fmtconv_command(a))
            rounds.setdefault(name, []).append(results.pop(name + tag))
            if name != "fmtconv" or tag:
                drop(name + tag)
    for name, rs in rounds.items():
        results[name] = _median_run(rs)
    first_run(report, rounds.get("fmtconv", []))
    if "usual" in phases:
        run("usual", "usual", {"src": str(src), "recipe": V4_RECIPE}, params, bytes_in)
        if _ok(results, "fmtconv", "usual"):
            identical = same_tensors(runs / "fmtconv", runs / "usual")
        drop("usual")
    if "threads" in phases:
        report["thread_scaling"] = _threads(run, results, src, runs, params, bytes_in, p.total_bytes)
    drop("fmtconv")
    report["fmtconv_bytes_equal_usual"] = identical
    if "v3" in phases:
        report["v3"] = _v3(root, size_bytes, run, results, runs, quiet, v3_shape, drop, repeat)
        report["v3_bytes_identical"] = report["v3"]["bytes_identical"]
    if not keep:
        shutil.rmtree(runs, ignore_errors=True)
    report["phases"] = results
    _ratio(report, "ratio_fmtconv_over_usual", "usual", "fmtconv")
    _ratio(report, "ratio_fmtconv_over_copy", "copy", "fmtconv")
    _ratio(report, "ratio_fmtconv_metal_over_copy", "copy", "fmtconv_metal")
    _ratio(report, "ratio_fmtconv_metal_over_usual", "usual", "fmtconv_metal")
    _ratio(report, "ratio_v3_fmtconv_over_mlx_lm", "v3_mlx_lm", "v3_fmtconv")
    _ratio(report, "ratio_mse_over_minmax", "mse", "fmtconv")  # a cost (slow / fast), not a speed-up
    if _ok(results, "copy"):
        report["copy_mb_per_s"] = results["copy"]["mb_per_s"]
    fm = [results[k]["peak_rss_mb"] for k in results if k.startswith(("fmtconv", "v3_fmtconv")) and _ok(results, k)]
    if fm:
        report["fmtconv_peak_rss_mb"] = max(fm)
    report["load_avg_before"], report["load_avg_after"] = load_before, _load()
    report["targets"] = check_targets(report)
    return report


RAM_DIR = Path("/dev/shm")  # Linux tmpfs: the threads phase writes there when it has room, to time compute, not the disk


def _threads_out(runs: Path, out_bytes: int) -> Path:
    if RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK) and shutil.disk_usage(RAM_DIR).free > 1.5 * out_bytes:
        return RAM_DIR / f"fmtconv-bench-{os.getpid()}"
    return runs


def _threads(run, results: dict[str, Any], src: Path, runs: Path, params: int, bytes_in: int, out_bytes: int) -> dict[str, Any]:
    """fmtconv (cpu arithmetic) pinned to 1, 2, ... all cores, writing to tmpfs where there is room (so the shared
    disk does not hide the compute); Mparam/s for each, and whether the bytes agree with the all-core run."""
    n_all = _cpus()
    counts = sorted({1, min(2, n_all), n_all})
    where = _threads_out(runs, out_bytes)
    scaling: dict[str, Any] = {"mparam_per_s": {}, "output_on": "tmpfs" if where != runs else "disk"}
    same = True
    for n in counts:
        name = f"fmtconv_cores_{n}"
        a = ["convert", str(src), str(where / name), "--recipe", V4_RECIPE, "--kernel-backend", "cpu", "--quiet", "--workers", str(n)]
        run(name, "fmtconv", {"src": str(src), "args": a}, params, bytes_in, cores=n, command=fmtconv_command(a),
            out=where / name)
        if not _ok(results, name):
            continue
        scaling["mparam_per_s"][str(n)] = round(results[name]["params_per_s"] / 1e6, 1)
        if _ok(results, "fmtconv"):
            same = same and same_tensors(runs / "fmtconv", where / name)
        shutil.rmtree(where / name, ignore_errors=True)  # tmpfs is memory: never kept
    if where != runs:
        shutil.rmtree(where, ignore_errors=True)
    base = scaling["mparam_per_s"].get("1")
    if base:
        scaling["speedup_over_1_core"] = {k: round(v / base, 2) for k, v in scaling["mparam_per_s"].items()}
    scaling["bytes_identical_to_all_core_run"] = same
    return scaling


def _v3(root: Path, size_bytes: int, run, results: dict[str, Any], runs: Path, quiet: bool, v3_shape: dict[str, Any] | None,
        drop, repeat: int = 1) -> dict[str, Any]:
    """fmtconv fp8-to-affine and mlx_lm.convert on the DeepSeek-V3-style checkpoint, same settings, bytes compared."""
    from fmtconv.convert.api import plan as make_plan
    from fmtconv.convert.recipes import source_recipe

    src = generate_v3_checkpoint(root, size_bytes, quiet=quiet, **(v3_shape or {}))
    p = make_plan(src, source_recipe(V3_BITS, 64, ("fp8_block",), "v3", other_bits=V3_BITS), kernel_backend="cpu")
    params, bytes_in = p.total_params, p.source_bytes
    tries = []
    for i in range(repeat):
        name = "v3_fmtconv" if i == 0 else f"v3_fmtconv#{i}"
        a = ["fp8-to-affine", str(src), str(runs / name), "--bits", str(V3_BITS), "--other-bits", str(V3_BITS),
             "--kernel-backend", "cpu", "--quiet", "--json"]
        run(name, "fmtconv", {"src": str(src), "args": a}, params, bytes_in, command=fmtconv_command(a))
        tries.append(results.pop(name))
        if i:
            drop(name)
    results["v3_fmtconv"] = _median_run(tries)
    out: dict[str, Any] = {"checkpoint": str(src), "source_bytes": bytes_in, "params": params, "bytes_identical": None}
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        out["mlx_lm"] = "not installed: the v3_mlx_lm phase was skipped"
        drop("v3_fmtconv")
        return out
    cmd = mlx_lm_command(src, runs / "v3_mlx_lm", V3_BITS)
    run("v3_mlx_lm", "mlx_lm", {"src": str(src), "bits": V3_BITS}, params, bytes_in, command=cmd)
    if _ok(results, "v3_fmtconv", "v3_mlx_lm"):
        out["bytes_identical"] = same_tensors(runs / "v3_fmtconv", runs / "v3_mlx_lm")
    drop("v3_fmtconv", "v3_mlx_lm")
    return out


def check_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this report: name, value, target, met (None where the phase did not run)."""
    out = []
    for name, key, op, threshold in TARGETS:
        value = report.get(key)
        checks = {">=": lambda v: v >= threshold, "<=": lambda v: v <= threshold, "==": lambda v: v == threshold}
        met = None if value is None else bool(checks[op](value))
        out.append({"name": name, "key": key, "value": value, "target": f"{op} {threshold}", "met": met})
    return out


def scaling_report(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Between the smallest and largest size: size ratio, and per phase the wall-time and peak-RSS ratios; for the
    fmtconv phases, whether the time ratio is within SCALING_TOLERANCE of the size ratio (the speed issue's target)."""
    a, b = runs[0], runs[-1]
    size_ratio = b["source_bytes"] / a["source_bytes"]
    out: dict[str, Any] = {"size_ratio": round(size_ratio, 3), "phases": {}, "targets": []}
    for name, ra in a["phases"].items():
        rb = b["phases"].get(name)
        if _ok(a["phases"], name) and _ok(b["phases"], name):
            t = rb["wall_s"] / ra["wall_s"]
            out["phases"][name] = {"time_ratio": round(t, 3), "peak_rss_ratio": round(rb["peak_rss_mb"] / ra["peak_rss_mb"], 3)}
            if name in ("fmtconv", "fmtconv_metal"):
                out["targets"].append({"name": f"{name}: time ratio / size ratio", "key": f"{name}_time_over_size",
                                       "value": round(t / size_ratio, 3), "target": f"1 +- {SCALING_TOLERANCE}",
                                       "met": abs(t / size_ratio - 1) <= SCALING_TOLERANCE})
    return out


def run_bench(out_dir: Path | None, size_bytes: int | list[int], json_out: bool, keep: bool, *, workers: int | None = None,
              phases: tuple[str, ...] = PHASES, repeat: int = 1, cold: bool = False, shape: dict[str, Any] | None = None,
              v3_shape: dict[str, Any] | None = None, discard_data: bool = False) -> dict[str, Any]:
    """Run the bench at one size (the report) or several (`runs`, `scaling`); print a table or JSON; return it.
    discard_data: remove each size's synthetic checkpoints once its phases are done (disk room for the next size)."""
    import json

    unknown = set(phases) - set(PHASES_ALL)
    if unknown or not phases:
        from fmtconv.errors import FmtconvError

        raise FmtconvError(f"--phases: unknown or no bench phase(s) {sorted(unknown)}; choose from {', '.join(PHASES_ALL)}")
    root = Path(out_dir) if out_dir is not None else DEFAULT_DIR
    sizes = size_bytes if isinstance(size_bytes, list) else [size_bytes]
    reports = []
    for s in sizes:
        reports.append(bench_one_size(root, s, phases=phases, workers=workers, keep=keep, quiet=json_out, repeat=max(1, repeat),
                                      cold=cold, shape=shape, v3_shape=v3_shape))
        if discard_data:
            for key in ("checkpoint", "v3"):
                where = reports[-1].get(key)
                shutil.rmtree(where["checkpoint"] if isinstance(where, dict) else where, ignore_errors=True)
    if len(reports) == 1:
        result = reports[0]
    else:
        result = {"runs": reports, "scaling": scaling_report(reports)}
    result["machine"] = {"cpus": _cpus(), "platform": platform.platform(), "versions": _versions()}
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        for r in reports:
            print_table(r)
        if len(reports) > 1:
            print_scaling(result["scaling"])
    return result


def print_table(report: dict[str, Any]) -> None:
    print(f"checkpoint  {report['checkpoint']}")
    print(f"            {report['source_bytes'] / 1e9:.2f} GB in, {report['output_bytes'] / 1e9:.2f} GB out, "
          f"{report['params'] / 1e9:.2f} G params, recipe {report['recipe']}, {report['cpus']} CPUs, {report['page_cache']} cache, "
          f"load {report['load_avg_before']} -> {report['load_avg_after']}")
    if "v3" in report:
        v3 = report["v3"]
        print(f"v3          {v3['checkpoint']}: {v3['source_bytes'] / 1e9:.2f} GB, {v3['params'] / 1e9:.2f} G params")
    print(f"{'phase':16s} {'wall s':>9s} {'Mparam/s':>9s} {'MB/s in+out':>12s} {'peak RSS MB':>12s} {'user s':>7s} {'sys s':>7s}")
    for name, r in report["phases"].items():
        if "error" in r:
            print(f"{name:16s} failed: {r['error']}")
            continue
        print(f"{name:16s} {r['wall_s']:9.2f} {r['params_per_s'] / 1e6:9.1f} {r['mb_per_s']:12.1f} {r['peak_rss_mb']:12.1f} "
              f"{r['cpu_user_s']:7.1f} {r['cpu_sys_s']:7.1f}")
    if "thread_scaling" in report:
        ts = report["thread_scaling"]
        print("threads     " + ", ".join(f"{k} cores {v} Mparam/s" for k, v in ts["mparam_per_s"].items())
              + f"; bytes identical: {ts['bytes_identical_to_all_core_run']}")
    if report.get("fmtconv_bytes_equal_usual") is not None:
        print(f"fmtconv bytes == usual pipeline bytes: {report['fmtconv_bytes_equal_usual']}")
    if "ratio_mse_over_minmax" in report:
        print(f"mse / minmax     {report['ratio_mse_over_minmax']:.2f}x wall  (target <= 3)")
    if report.get("v3_bytes_identical") is not None:
        print(f"fmtconv bytes == mlx_lm.convert bytes (V3): {report['v3_bytes_identical']}")
    for t in report["targets"]:
        if t["value"] is not None:
            print(f"  {t['name']:40s} {t['value']!s:>8s}  target {t['target']:8s} {'met' if t['met'] else 'NOT met'}")


def print_scaling(s: dict[str, Any]) -> None:
    print(f"scaling: size x{s['size_ratio']}")
    for name, r in s["phases"].items():
        print(f"  {name:16s} time x{r['time_ratio']}, peak RSS x{r['peak_rss_ratio']}")
    for t in s.get("targets", []):
        print(f"  {t['name']:40s} {t['value']!s:>8s}  target {t['target']:8s} {'met' if t['met'] else 'NOT met'}")
