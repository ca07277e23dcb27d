"""Reliability class 11: the disk fills up while writing. A file-size limit (RLIMIT_FSIZE, as `ulimit -f`) in a
child process makes the kernel refuse the write (EFBIG); a failing write in-process stands for ENOSPC. The run
stops with a clear error naming the shard, finished shards stay in OUT.partial, OUT never appears, and a re-run
with room resumes and writes a bundle byte-identical to an uninterrupted run."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest

import reliability_helpers as rh
from fmtconv.convert import convert
from fmtconv.errors import FmtconvError
from fmtconv.formats import safetensors_io
from fmtconv.convert.pipeline import MANIFEST

SHARD_CAP = "40KB"  # deepseek-v4-tiny then makes 17 shards; the 5th is the first over 45,000 bytes
FILE_LIMIT = 45_000


def _limit_file_size(ignore_sigxfsz: bool):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
        if ignore_sigxfsz:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    return preexec


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One source and the bundle an uninterrupted run writes from it (into an OUT of the same name)."""
    base = tmp_path_factory.mktemp("diskfull")
    src = rh.copy_fixture(rh.V4, base / "src")
    ref = base / "ref" / "out"
    ref.parent.mkdir()
    assert rh.run_cli("mxfp4-to-affine", src, ref, "--quiet", "--max-shard-size", SHARD_CAP).returncode == 0
    return src, rh.tree_bytes(ref)


@pytest.mark.parametrize("cli_ignores_sigxfsz", [True, False], ids=["cli", "child-ignores-sigxfsz"])
def test_file_size_limit_then_resume(tmp_path: Path, reference, cli_ignores_sigxfsz: bool) -> None:
    src, expected = reference
    before = rh.tree_hashes(src)
    out = tmp_path / "out"
    proc = rh.run_cli("mxfp4-to-affine", src, out, "--quiet", "--max-shard-size", SHARD_CAP,
                      preexec_fn=_limit_file_size(ignore_sigxfsz=not cli_ignores_sigxfsz))
    rh.assert_cli_refuses(proc, "disk full while writing", "File too large", "model-00005-of-00017.safetensors",
                          "free space and run the same command again to resume")
    rh.assert_no_bundle(out, partial_ok=True)
    partial = rh.partial_of(out)
    kept = sorted(p.name for p in partial.glob("*.safetensors"))
    assert kept == [f"model-{i:05d}-of-00017.safetensors" for i in range(1, 5)]
    assert (partial / MANIFEST).exists() and not list(partial.glob("*.tmp"))
    inodes = {n: (partial / n).stat().st_ino for n in kept}
    assert rh.tree_hashes(src) == before

    proc = rh.run_cli("mxfp4-to-affine", src, out, "--quiet", "--max-shard-size", SHARD_CAP)
    assert proc.returncode == 0, proc.stderr
    assert not partial.exists()
    assert {n: (out / n).stat().st_ino for n in kept} == inodes  # the finished shards were kept, not rewritten
    assert rh.tree_bytes(out) == expected
    assert rh.tree_hashes(src) == before


def test_no_space_left_mid_shard_api(tmp_path: Path, reference, monkeypatch) -> None:
    """ENOSPC from a write in the middle of a shard (a worker thread): same error, same resume."""
    src, expected = reference
    before = rh.tree_hashes(src)
    out = tmp_path / "out"
    real = safetensors_io.PreallocatedSafetensorsWriter.write_at
    calls = {"n": 0}

    def write_at(self, name, offset, data):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, name, offset, data)

    monkeypatch.setattr(safetensors_io.PreallocatedSafetensorsWriter, "write_at", write_at)
    with pytest.raises(FmtconvError, match="disk full while writing .No space left on device.") as ei:
        convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=40_000, workers=2)
    assert ".safetensors" in str(ei.value) and "model-00001" not in str(ei.value)
    rh.assert_no_bundle(out, partial_ok=True)
    assert list(rh.partial_of(out).glob("model-00001-of-00017.safetensors"))
    monkeypatch.setattr(safetensors_io.PreallocatedSafetensorsWriter, "write_at", real)
    convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=40_000)
    assert rh.tree_bytes(out) == expected
    assert rh.tree_hashes(src) == before


def test_too_little_free_space_refused_up_front(tmp_path: Path, reference, monkeypatch) -> None:
    """The free-space check refuses before anything is created when the bundle cannot fit."""
    import shutil

    from fmtconv.convert import pipeline

    src, _ = reference
    real = shutil.disk_usage
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rh.api_refuses(src, tmp_path / "out", "GB of free disk but 0.00 GB is free", str(tmp_path), recipe=rh.mxfp4_recipe())
