"""The phases `fmtconv bench` times, each run in a child process of its own so that its peak RSS is its own.

  fmtconv  `fmtconv convert|fp8-to-affine ...` (the command, a process of the child's), optionally pinned to N cores.
  usual    what people do: per output tensor, dequantize to bfloat16 (NumPy for FP4, mx.from_fp8 for FP8), stack
           experts, mx.quantize, mx.save_safetensors in 5 GB shards, one process.
  copy     read every source byte and write as many bytes as fmtconv writes, fsync: the disk's own speed.
  mlx_lm   `mlx_lm.convert --hf-path SRC --mlx-path OUT -q --q-bits 4` (its CLI entry point, in the child).
Peak RSS is the child's VmHWM (/proc/self/status), or ru_maxrss from wait4 where /proc is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv.convert.process import python_child

_COPY_CHUNK = 1 << 24


def fmtconv_command(args: list[str]) -> list[str]:
    """The command line a fmtconv phase runs (shown in the report)."""
    return ["fmtconv", *args]


def mlx_lm_command(src: Path, out: Path, bits: int) -> list[str]:
    return ["mlx_lm.convert", "--hf-path", str(src), "--mlx-path", str(out), "-q", "--q-bits", str(bits)]


def phase_fmtconv(src: Path, out: Path, *, args: list[str]) -> dict[str, Any]:
    """The `fmtconv <args>` command, run as a program in a process of its own, as a user runs it; the wall time of the
    command, bytes written, its peak RSS (its own: this small parent's high-water mark, carried into the child over
    fork and exec, stays below any conversion's) and, where args ask for --json, what the run reports of its kernels
    (seconds to compile or load each, and whether numba compiled it)."""
    import resource

    t0 = time.perf_counter()
    proc = subprocess.run(python_child("-m", "fmtconv.convert.cli", *args), stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"fmtconv {' '.join(args)} exited with {proc.returncode}")
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    out_ = {"wall_s": wall, "bytes_out": _weights_bytes(out), "vm_hwm_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * unit}
    if "--json" in args:
        out_["kernels"] = json.loads(proc.stdout).get("kernels", {})
    return out_


def phase_mlx_lm(src: Path, out: Path, *, bits: int) -> dict[str, Any]:
    """mlx_lm.convert's own CLI entry point with `-q --q-bits bits` (its defaults otherwise: group 64, affine)."""
    from mlx_lm.convert import main

    argv = mlx_lm_command(src, out, bits)
    saved = sys.argv
    sys.argv = argv
    t0 = time.perf_counter()
    try:
        main()
    finally:
        sys.argv = saved
    return {"wall_s": time.perf_counter() - t0, "bytes_out": _weights_bytes(out)}


def _weights_bytes(out: Path) -> int:
    """Tensor bytes in a bundle (headers not counted), as the plan's output_bytes counts them."""
    from fmtconv.formats.safetensors_io import Checkpoint

    with Checkpoint(out) as ck:
        return sum(info.nbytes for info in ck.tensors.values())


def phase_usual(src: Path, out: Path, *, recipe: str, max_shard_bytes: int = 5 << 30) -> dict[str, Any]:
    """Per output tensor: dequantize to bfloat16, stack experts, mx.quantize, save in shards (one process).

    The tensors and their targets come from fmtconv's plan (so both do the same work); the
    arithmetic is NumPy's FP4 table lookup, MLX's from_fp8, and MLX's quantize on its CPU backend.
    """
    import mlx.core as mx

    from fmtconv.convert.api import plan as make_plan
    from fmtconv.convert.plan import CAST, PASSTHROUGH, REQUANT
    from fmtconv.formats.safetensors_io import Checkpoint, shard_names
    from fmtconv.kernels_ref import E2M1_VALUES

    t0 = time.perf_counter()
    p = make_plan(src, recipe)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, Any] = {}
    size = 0
    files: list[Path] = []
    weight_map: dict[str, Path] = {}
    bytes_out = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            f = out / f"shard-{len(files):05d}.safetensors"
            mx.save_safetensors(str(f), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, f))
            files.append(f)
            shard, size = {}, 0

    def decode(ck: Checkpoint, g) -> mx.array:
        w = ck.raw(g.parts.get("weight", g.name))
        if g.codec == "mxfp4":
            packed = w.reshape(g.rows, -1)
            vals = np.empty((g.rows, packed.shape[1] * 2), dtype=np.float32)
            vals[:, 0::2] = E2M1_VALUES[packed & 0x0F]
            vals[:, 1::2] = E2M1_VALUES[packed >> 4]
            s = np.ldexp(np.float32(1), ck.raw(g.parts["scale"]).reshape(g.rows, -1).astype(np.int32) - 127)
            vals = (vals.reshape(g.rows, -1, 32) * s[..., None]).reshape(g.shape)
            return mx.array(vals).astype(mx.bfloat16)
        if g.codec == "fp8_block":
            bm, bn = g.params.get("block", (128, 128))
            x = mx.from_fp8(mx.array(w.reshape(g.shape)), dtype=mx.bfloat16)
            s = mx.power(2.0, mx.array(ck.raw(g.parts["scale"]).astype(np.float32) - 127)).reshape(-(-g.shape[0] // bm), -1)
            s = mx.repeat(mx.repeat(s, bm, axis=0), bn, axis=1)[: g.shape[0], : g.shape[1]]
            return (x * s).astype(mx.bfloat16)
        return mx.array(np.asarray(ck.array(g.name)))

    with Checkpoint(src) as ck:
        for pt in p.tensors:
            t = pt.target
            parts = [decode(ck, g) for g in t.sources]
            w = parts[0] if len(parts) == 1 else mx.stack(parts)
            if t.transform is not None:
                w = mx.array(np.asarray(t.transform(np.array(w.astype(mx.float32))))).astype(w.dtype)
            if t.rows is not None:
                w = w[..., slice(*t.rows), :]
            if pt.route == REQUANT:
                wq, sc, bi = mx.quantize(w.astype(mx.bfloat16), group_size=pt.group_size, bits=pt.bits)
                new = {f"{t.module}.weight": wq, f"{t.module}.scales": sc, f"{t.module}.biases": bi}
            elif pt.route in (PASSTHROUGH, CAST):
                new = {t.name: w.astype(getattr(mx, pt.dtype))}
            else:
                raise RuntimeError(f"usual pipeline: route {pt.route} not handled")
            mx.eval(new)
            nb = sum(v.nbytes for v in new.values())
            if size + nb > max_shard_bytes:
                flush()
            shard.update(new)
            size += nb
            bytes_out += nb
            for g in t.sources:
                for name in g.parts.values():
                    ck.release(name)
            del parts, w
        flush()
    for f in files:
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    names = shard_names(len(files))
    for i, f in enumerate(files):
        os.replace(f, out / names[i])
    return {"wall_s": time.perf_counter() - t0, "bytes_out": bytes_out}


def phase_copy(src: Path, out: Path, *, bytes_out: int) -> dict[str, Any]:
    """Read every source weight byte, write `bytes_out` bytes (the source's, repeated as needed), fsync."""
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    buf = bytearray(_COPY_CHUNK)
    view = memoryview(buf)
    left = bytes_out
    with open(out / "copy.bin", "wb") as dst:
        for f in sorted(Path(src).glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    k = min(n, left)
                    if k:
                        dst.write(view[:k])
                        left -= k
        while left > 0:
            k = min(left, len(buf))
            dst.write(view[:k])
            left -= k
        dst.flush()
        os.fsync(dst.fileno())
    return {"wall_s": time.perf_counter() - t0, "bytes_out": bytes_out}


# ---------------------------------------------------------------------------------------------
# Running phases in children and reporting
# ---------------------------------------------------------------------------------------------


def run_phase_in_child(phase: str, kwargs: dict[str, Any], *, cores: int | None = None,
                       env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase in a fresh interpreter (pinned to its first `cores` CPUs where the platform allows);
    its result plus `peak_rss_bytes` (that child's own peak)."""
    with tempfile.TemporaryDirectory(prefix="fmtconv-bench-") as d:
        result_path = Path(d) / "result.json"
        cmd = python_child("-m", "fmtconv.convert.bench.phases", "--phase", phase, "--phase-args", json.dumps(kwargs),
                           "--result", str(result_path))
        if cores:
            cmd += ["--cores", str(cores)]
        # The child's stdout goes to our stderr: mlx_lm.convert prints progress, and `--json` owns stdout.
        before = pressure()
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=2)
        _, status, usage = os.wait4(proc.pid, 0)
        after = pressure()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"bench phase {phase!r} failed with exit code {proc.returncode}")
        result = json.loads(result_path.read_text())
    # ru_maxrss of a child starts at the RSS its parent had when it forked (Linux carries the pre-exec
    # high-water mark over exec), so the child's own VmHWM is the figure; ru_maxrss is the fallback.
    result["peak_rss_bytes"] = result.get("vm_hwm_bytes") or usage.ru_maxrss * 1024
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    result["cpu_user_s"], result["cpu_sys_s"] = usage.ru_utime, usage.ru_stime
    if before and after:  # seconds during which some task on the machine waited for a CPU / for I/O (Linux PSI)
        result["stall_s"] = {k: round((after[k] - before[k]) / 1e6, 2) for k in before}
    return result


def pressure() -> dict[str, int] | None:
    """Linux pressure-stall totals (microseconds) of CPU and I/O "some", or None where /proc/pressure is missing."""
    out = {}
    for res in ("cpu", "io"):
        try:
            line = Path(f"/proc/pressure/{res}").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        out[res] = int(line.rsplit("total=", 1)[1])
    return out


def peak_rss_self() -> int | None:
    """This process's peak resident set size since exec, in bytes (fmtconv.convert.process)."""
    from fmtconv.convert.process import peak_rss_bytes

    return peak_rss_bytes()


def evict_page_cache(src: Path) -> bool:
    """Drop a checkpoint's cached pages (POSIX_FADV_DONTNEED on each .safetensors file; only this checkpoint's pages,
    and only clean ones), so the next phase reads it from the disk; False where the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in sorted(Path(src).glob("*.safetensors")):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # written pages must be clean to be dropped (a freshly generated checkpoint)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def pin_to_cores(n: int) -> bool:
    """Restrict this process to its first n allowed CPUs (Linux); False where the platform cannot."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:n])
        return True
    except AttributeError:
        return False


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two bundles hold the same tensor names with the same dtypes, shapes and bytes."""
    from fmtconv.formats.safetensors_io import Checkpoint

    with Checkpoint(a) as x, Checkpoint(b) as y:
        if set(x.tensors) != set(y.tensors):
            return False
        for name in x.tensors:
            ix, iy = x.info(name), y.info(name)
            if (ix.dtype, tuple(ix.shape)) != (iy.dtype, tuple(iy.shape)) or not np.array_equal(x.raw(name), y.raw(name)):
                return False
            x.release(name)
            y.release(name)
    return True


def _run_phase(phase: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    fn = {"fmtconv": phase_fmtconv, "usual": phase_usual, "copy": phase_copy, "mlx_lm": phase_mlx_lm}[phase]
    kw = dict(kwargs)
    src, out = Path(kw.pop("src")), Path(kw.pop("out"))
    return fn(src, out, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fmtconv.convert.bench.phases", description="one bench phase (internal)")
    ap.add_argument("--phase", required=True)
    ap.add_argument("--phase-args", required=True)
    ap.add_argument("--result", required=True)
    ap.add_argument("--cores", type=int)
    a = ap.parse_args(argv)
    pinned = pin_to_cores(a.cores) if a.cores else None
    result = _run_phase(a.phase, json.loads(a.phase_args))
    result["vm_hwm_bytes"] = max(result.get("vm_hwm_bytes") or 0, peak_rss_self() or 0) or None
    result["pinned"] = pinned
    Path(a.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
