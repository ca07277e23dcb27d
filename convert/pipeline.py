"""Executes a plan: row blocks stream through decode -> encode into preallocated shards.

Memory stays bounded: sources are read through mmap one row block at a time (pages released
after use), results are staged in the shard's aligned chunks and written behind (formats/shard_writer.py),
and at most a few blocks are in flight.  Work goes into `OUT.partial/`; a manifest records finished
shards with their digest so a re-run resumes; `OUT.partial` becomes `OUT` only once index, config and
side files are complete.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv import __version__
from fmtconv.convert.plan import Plan
from fmtconv.convert.bundle.files import copy_side_files, output_config
from fmtconv.convert.check.conformance import check_plan, enforce
from fmtconv.convert.encode import Job, TensorEncoder, block_elements, iter_jobs, kernel_keys
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import Checkpoint, PreallocatedSafetensorsWriter, write_index
from fmtconv.formats.shard_writer import ChunkPool, shard_digest

MANIFEST = "fmtconv-manifest.json"
LOCK = ".fmtconv.lock"
# Write errors that mean "no room": a full disk, a quota, a file-size limit (ulimit -f, with SIGXFSZ ignored).
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Converter(TensorEncoder):
    """Runs one plan into OUT (via OUT.partial), resumable, on `workers` threads."""

    def __init__(self, plan: Plan, out: Path, *, workers: int | None = None, progress: Callable[[int, int], None] | None = None,
                 tensor_progress: Callable[[int, int], None] | None = None):
        super().__init__(plan)
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.workers = workers or available_cpus()
        self.progress = progress  # (bytes written, total bytes)
        self.tensor_progress = tensor_progress  # (tensors finished, total tensors)
        self._tensors_done = 0
        self._lock_fd: int | None = None
        self.conformance: list[Any] = []  # the runtime checks, after planning and before the rename
        self._done_bytes = 0
        self._done_lock = threading.Lock()
        self._t0 = time.perf_counter()  # reset by check(): the run's wall time starts there
        self._pool = ChunkPool()  # the shards' write buffers, reused from shard to shard
        self.kernels: dict[str, Any] = {}  # kernels warmed up by this run: seconds, and whether numba compiled them

    # ---- one shard -----------------------------------------------------------------------------
    def _run_job(self, ck: Checkpoint, job: Job, writers: dict[str, PreallocatedSafetensorsWriter]) -> int:
        pt = job.tensor
        g = pt.target.sources[job.src]
        parts = {role: ck.array(name) for role, name in g.parts.items()}
        try:
            outs = self._encode(pt, parts, job)
        except FmtconvError as e:
            if e.tensor is None:  # a kernel's refusal: say which file and tensor it came from
                raise FmtconvError(str(e), file=e.file or ck.info(next(iter(g.parts.values()))).file, tensor=g.name) from e
            raise
        except (ValueError, TypeError, IndexError, FloatingPointError) as e:
            raise FmtconvError(f"cannot convert ({type(e).__name__}: {e})", file=ck.info(next(iter(g.parts.values()))).file, tensor=g.name) from e
        finally:
            del parts
            for name in g.parts.values():
                ck.release(name, (job.start, job.stop, g.rows))
        written = 0
        for spec in pt.parts:
            arr = outs[spec.name]
            total_rows = int(np.prod(spec.shape[:-1])) if len(spec.shape) > 1 else 1
            row_bytes = spec.nbytes // max(total_rows, 1)
            data = np.ascontiguousarray(arr)
            writers[spec.name].write_at(spec.name, job.out_row * row_bytes, data)
            written += data.nbytes
        return written

    def _write_shard(self, ck: Checkpoint, index: int, fname: str) -> str:
        specs = self.plan.shards[index]
        names = {s.name for s in specs}
        tensors = [pt for pt in self.plan.tensors if any(p.name in names for p in pt.parts)]
        writer = PreallocatedSafetensorsWriter(self.partial / fname, specs, {"format": "mlx"}, pool=self._pool)
        writers = {s.name: writer for s in specs}
        jobs = [list(iter_jobs(pt, block_elements(self.plan, pt))) for pt in tensors]
        left = [len(j) for j in jobs]

        def job_done(f: cf.Future) -> None:
            t = f.tensor_index  # type: ignore[attr-defined]
            left[t] -= 1
            if left[t] == 0:
                self._tensors_done += 1
                if self.tensor_progress:
                    self.tensor_progress(self._tensors_done, len(self.plan.tensors))
        try:
            with cf.ThreadPoolExecutor(self.workers) as pool:
                pending: set[cf.Future] = set()
                for t, tensor_jobs in enumerate(jobs):
                    for job in tensor_jobs:
                        read_ahead(ck, job)
                        f = pool.submit(self._run_job, ck, job, writers)
                        f.tensor_index = t  # type: ignore[attr-defined]
                        pending.add(f)
                        if len(pending) >= 2 * self.workers:
                            pending = self._drain(pending, cf.FIRST_COMPLETED, job_done)
                self._drain(pending, cf.ALL_COMPLETED, job_done)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self._check_source_unchanged()
        assert writer.digest is not None
        return writer.digest

    def _drain(self, pending: set[cf.Future], how: str, on_done: Callable[[cf.Future], None] | None = None) -> set[cf.Future]:
        done, rest = cf.wait(pending, return_when=how)
        for f in done:
            if f.exception() is not None:
                for r in rest:
                    r.cancel()
                raise f.exception()  # type: ignore[misc]
            if on_done is not None:
                on_done(f)
            with self._done_lock:
                self._done_bytes += f.result()
                if self.progress:
                    self.progress(self._done_bytes, self.plan.total_bytes)
        return rest

    def _check_source_unchanged(self) -> None:
        for name, (size, mtime) in self.plan.source_files.items():
            p = self.plan.source / name
            try:
                st = p.stat()
            except OSError:
                raise FmtconvError("source file disappeared during the conversion", file=p) from None
            if (st.st_size, st.st_mtime_ns) != (size, mtime):
                raise FmtconvError("source file changed during the conversion (size or mtime); stopping", file=p)

    # ---- the whole run -------------------------------------------------------------------------
    def run(self, *, overwrite: bool = False, extra_files: Callable[[Path], None] | None = None) -> dict[str, Any]:
        """check, write, commit: OUT appears complete or not at all."""
        self.check(overwrite)
        self.write(extra_files)
        return self.commit(overwrite)

    def check(self, overwrite: bool = False) -> None:
        """Refusals before anything is created: OUT, the planned tensors against the runtime's own model class, disk."""
        self._t0 = time.perf_counter()
        check_out_path(self.plan.source, self.out, overwrite)
        self.conformance = [enforce(check_plan(self.plan), where=self.out)]
        if not self.partial.exists():
            check_disk_space(_existing_parent(self.partial), self.plan.total_bytes)

    def write(self, extra_files: Callable[[Path], None] | None = None) -> None:
        """Every shard, then index, config, side files and the runtime check, into OUT.partial (resumable)."""
        resuming = self.partial.exists()
        self.partial.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        writing = self.partial
        try:
            manifest = self._load_manifest()
            if resuming:  # only the shards still to write need room
                check_disk_space(self.partial, self.plan.total_bytes - sum(
                    (self.partial / f).stat().st_size for f in manifest["shards"] if (self.partial / f).exists()))
            self._done_bytes = sum(
                sum(s.nbytes for s in self.plan.shards[i]) for i, f in enumerate(self.plan.shard_files) if f in manifest["shards"])
            finished = {s.name for i, f in enumerate(self.plan.shard_files) if f in manifest["shards"] for s in self.plan.shards[i]}
            self._tensors_done = sum(1 for pt in self.plan.tensors if all(p.name in finished for p in pt.parts))
            from fmtconv.kernels import auto_for, warm_up

            auto_for(self.plan.total_params)
            self.kernels = warm_up(kernel_keys(self.plan))  # compile or load the plan's kernels now, not in the first jobs
            try:
                with Checkpoint(self.plan.source) as ck:
                    for i, fname in enumerate(self.plan.shard_files):
                        if fname in manifest["shards"]:
                            continue
                        writing = self.partial / fname
                        digest = self._write_shard(ck, i, fname)
                        manifest["shards"][fname] = digest
                        self._save_manifest(manifest)
                writing = self.partial
                self._finish(extra_files)
            except OSError as e:
                if e.errno not in _DISK_FULL:
                    raise
                raise FmtconvError(f"disk full while writing ({os.strerror(e.errno)}); finished shards are kept in "
                                   f"{self.partial.name}: free space and run the same command again to resume",
                                   file=e.filename or writing) from None
            except FmtconvError:
                _remove(self.partial)  # bad input: nothing here can be resumed (a fixed source or recipe restarts the work)
                raise
        finally:
            self._release_lock()

    def discard(self) -> None:
        """Remove OUT.partial (a written bundle whose companion failed on bad input)."""
        _remove(self.partial)

    def commit(self, overwrite: bool = False) -> dict[str, Any]:
        """OUT.partial becomes OUT (replacing an old OUT only with overwrite); the run summary."""
        if self.out.exists():
            if not overwrite:
                raise FmtconvError("output appeared during the conversion; not replacing it without --overwrite", file=self.out)
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.partial, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, self.out)
        wall = time.perf_counter() - self._t0
        out = summary(self.plan, self.out, wall)
        out["conformance"] = [c.to_json() for c in self.conformance]
        out["kernels"] = self.kernels
        out["warnings"] = out["warnings"] + list(dict.fromkeys(c.skipped for c in self.conformance if c.skipped))
        return out

    def _finish(self, extra_files: Callable[[Path], None] | None) -> None:
        write_index(self.partial, self.plan.weight_map(), self.plan.total_bytes)
        copy_side_files(self.plan.source, self.partial, with_readme=extra_files is None)
        config = output_config(self.plan)
        self._write_config(config)
        # The written bundle, as the runtime's loader reads it; a difference stops here, before OUT exists.
        check = enforce(check_plan(self.plan, self.partial), where=self.partial)
        self.conformance.append(check)
        config["fmtconv"]["runtime_check"] = check.record()
        self._write_config(config)
        if extra_files is not None:
            extra_files(self.partial)
        (self.partial / MANIFEST).unlink(missing_ok=True)  # last: until now a re-run resumes with the finished shards

    def _write_config(self, config: dict[str, Any]) -> None:
        tmp = self.partial / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=4) + "\n")
        os.replace(tmp, self.partial / "config.json")

    def _load_manifest(self) -> dict[str, Any]:
        fingerprint = self.plan.fingerprint()
        path = self.partial / MANIFEST
        fresh = {"fmtconv": __version__, "plan": fingerprint, "shards": {}}
        try:
            m = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, json.JSONDecodeError):
            m = {}
        if m.get("plan") != fingerprint:  # no manifest, or different work: start over
            self._clear_partial(keep={LOCK})
            return fresh
        good = {}
        for fname, digest in m.get("shards", {}).items():
            p = self.partial / fname
            if p.exists() and shard_digest(p) == digest:
                good[fname] = digest
        self._clear_partial(keep={MANIFEST, LOCK, *good})  # unfinished shards (*.tmp) and anything unrecorded
        m["shards"] = good
        return m

    def _clear_partial(self, keep: set[str]) -> None:
        for stale in self.partial.iterdir():
            if stale.name not in keep:
                _remove(stale)

    def _save_manifest(self, m: dict[str, Any]) -> None:
        tmp = self.partial / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(m, indent=2))
        os.replace(tmp, self.partial / MANIFEST)

    def _acquire_lock(self) -> None:
        fd = os.open(self.partial / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise FmtconvError("another fmtconv conversion is writing into this output (lock held); refusing to interleave",
                               file=self.partial) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                (self.partial / LOCK).unlink(missing_ok=True)
            except OSError:
                pass
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def read_ahead(ck: Checkpoint, job: Job) -> None:
    """Ask the kernel to start reading a job's source rows now, so they are in memory when a worker gets to it."""
    g = job.tensor.target.sources[job.src]
    for name in g.parts.values():
        ck.will_need(name, (job.start, job.stop, g.rows))


def _existing_parent(p: Path) -> Path:
    """The nearest existing directory at or above p (where its bytes would land)."""
    p = Path(p).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink(missing_ok=True)


def check_out_path(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse OUT equal to or inside SRC (or SRC inside OUT), and an existing OUT without overwrite."""
    s, o = Path(src).resolve(), Path(out).resolve()
    if o == s or s in o.parents:
        raise FmtconvError("output must not be the source directory or inside it", file=out)
    if o in s.parents:
        raise FmtconvError("output must not contain the source directory", file=out)
    if o.exists() and not overwrite:
        raise FmtconvError("output exists; pass --overwrite to replace it", file=out)


def check_disk_space(where: Path, needed: int, margin: float = 1.05) -> None:
    free = shutil.disk_usage(where).free
    if needed * margin > free:
        raise FmtconvError(f"needs about {needed * margin / 1e9:.2f} GB of free disk but {free / 1e9:.2f} GB is free", file=where)


def summary(plan: Plan, out: Path, wall: float) -> dict[str, Any]:
    params = plan.total_params
    return {
        "output": str(out),
        "tensors": len(plan.tensors),
        "shards": len(plan.shards),
        "bytes_in": plan.source_bytes,
        "bytes_out": plan.total_bytes,
        "params": params,
        "bits_per_weight": round(plan.bits_per_weight, 4),
        "wall_s": round(wall, 3),
        "params_per_s": round(params / wall, 1) if wall > 0 else None,
        "mb_per_s_in": round(plan.source_bytes / 1e6 / wall, 2) if wall > 0 else None,
        "dropped": len(plan.dropped),
        "warnings": plan.warnings,
    }
