"""Crash safety at scale: SIGKILL a conversion mid-way (after finished shards) or right at its start,
re-run the same command, and get the bytes of an uninterrupted run; finished shards are kept, not redone.
Disk space: too little free space is refused before any work, leaving nothing behind."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import scale_helpers as sh

from fmtconv.convert import convert
from fmtconv.convert.pipeline import MANIFEST
from fmtconv.errors import FmtconvError

SHARD_BYTES = 600_000  # every 1024 x 1024 weight gets its own output shard (~1.1 MB at 8 bits)


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    tensors = {f"model.layers.0.mlp.w{i}.weight": (1024, 1024) for i in range(6)}
    return sh.dense_checkpoint(tmp_path_factory.mktemp("resume") / "src", tensors, shard_bytes=3 << 20)


@pytest.fixture(scope="module")
def reference(src: Path, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("ref") / "out"
    convert(src, out, recipe="q4q8", kernel_backend="cpu", workers=2, max_shard_bytes=SHARD_BYTES)
    return _tree(out)


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def _recorded(partial: Path) -> dict[str, str]:
    try:
        return json.loads((partial / MANIFEST).read_text())["shards"]
    except (OSError, ValueError, KeyError):
        return {}


def _start(src: Path, out: Path, pause: float) -> subprocess.Popen:
    script = sh.child_script(src, out, max_shard_bytes=SHARD_BYTES, pause_after_shard=pause)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the conversion finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


def test_kill_mid_way_then_resume(src: Path, reference: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    # A pause after each recorded shard keeps the run alive long enough to be killed between shards.
    proc = _start(src, out, pause=0.5)
    _kill_when(proc, lambda: len(_recorded(partial)) >= 2)
    assert not out.exists()
    kept = {name: (partial / name).stat().st_ino for name in _recorded(partial)}
    assert len(kept) >= 2
    convert(src, out, recipe="q4q8", kernel_backend="cpu", workers=2, max_shard_bytes=SHARD_BYTES)
    assert not partial.exists()
    assert _tree(out) == reference
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # verified and kept, not rewritten


def test_kill_at_start_then_resume(src: Path, reference: dict[str, bytes], tmp_path: Path) -> None:
    out = tmp_path / "out"
    partial = tmp_path / "out.partial"
    proc = _start(src, out, pause=0.5)
    _kill_when(proc, lambda: partial.is_dir())  # as soon as the work directory exists
    assert not out.exists() and len(_recorded(partial)) < 6
    convert(src, out, recipe="q4q8", kernel_backend="cpu", workers=2, max_shard_bytes=SHARD_BYTES)
    assert _tree(out) == reference and not partial.exists()


def test_too_little_disk_is_refused_before_any_work(src: Path, tmp_path: Path, monkeypatch) -> None:
    real = shutil.disk_usage

    def tiny_free(path):
        u = real(path)
        return type(u)(u.total, u.total - 1000, 1000)

    monkeypatch.setattr(shutil, "disk_usage", tiny_free)
    out = tmp_path / "out"
    with pytest.raises(FmtconvError, match="free disk") as err:
        convert(src, out, recipe="q4q8", kernel_backend="cpu", max_shard_bytes=SHARD_BYTES)
    assert "GB" in str(err.value)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert list(tmp_path.iterdir()) == []
