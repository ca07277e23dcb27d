"""Reliability class 15: symlinked and read-only sources convert like any other; a source file that changes or
disappears during the conversion is detected (size/mtime after each shard) and stops the run."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

import reliability_helpers as rh
from fmtconv.convert import convert
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import INDEX_NAME

CAP = 40_000


def _weights(out: Path) -> dict[str, bytes]:
    """Shards and index (config.json and the model card name the source path, which differs between runs)."""
    return {n: b for n, b in rh.tree_bytes(out).items() if n.endswith(".safetensors") or n == INDEX_NAME}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    base = tmp_path_factory.mktemp("srcdirs")
    src = rh.copy_fixture(rh.V4, base / "src")
    convert(src, base / "ref", recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP)
    return src, _weights(base / "ref")


def test_symlinked_source_dir_cli(tmp_path: Path, reference) -> None:
    src, want = reference
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    out = tmp_path / "out"
    proc = rh.run_cli("mxfp4-to-affine", link, out, "--quiet", "--max-shard-size", "40KB")
    assert proc.returncode == 0, proc.stderr
    assert _weights(out) == want and (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


def test_hub_cache_layout_with_symlinked_files(tmp_path: Path, reference) -> None:
    """The Hugging Face cache keeps a snapshot of relative symlinks into a blobs/ folder."""
    src, want = reference
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for p in src.iterdir():
        blob = blobs / f"blob{len(list(blobs.iterdir()))}"
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    before = rh.tree_hashes(blobs)
    convert(snap, tmp_path / "out", recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP)
    assert _weights(tmp_path / "out") == want
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())  # side files are copied, not linked
    assert rh.tree_hashes(blobs) == before


def test_read_only_source_cli(tmp_path: Path, reference) -> None:
    src, want = reference
    ro = rh.copy_fixture(rh.V4, tmp_path / "ro")
    before = rh.tree_hashes(ro)
    for p in ro.iterdir():
        p.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        out = tmp_path / "out"
        proc = rh.run_cli("mxfp4-to-affine", ro, out, "--quiet", "--max-shard-size", "40KB")
        assert proc.returncode == 0, proc.stderr
        assert _weights(out) == want
        assert not any(os.stat(out / n).st_mode & stat.S_IWUSR == 0 for n in os.listdir(out))  # the bundle is writable
        assert rh.tree_hashes(ro) == before
    finally:
        ro.chmod(0o755)
        for p in ro.iterdir():
            p.chmod(0o644)


def _change_during_run(tmp_path: Path, change) -> FmtconvError:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    shard = src / "model-00002-of-00002.safetensors"
    calls = {"n": 0}

    def progress(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            change(shard)
            calls["at_change"] = done

    out = tmp_path / "out"
    with pytest.raises(FmtconvError) as ei:
        convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP, workers=1, progress=progress)
    assert ei.value.file == str(shard)
    rh.assert_no_bundle(out)
    return ei.value


def test_source_appended_during_run(tmp_path: Path) -> None:
    err = _change_during_run(tmp_path, lambda p: p.open("ab").write(b"\0" * 16))
    assert "source file changed during the conversion (size or mtime); stopping" in str(err)


def test_source_touched_during_run(tmp_path: Path) -> None:
    def touch(p: Path) -> None:
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    err = _change_during_run(tmp_path, touch)
    assert "source file changed during the conversion" in str(err)


def test_source_removed_during_run(tmp_path: Path) -> None:
    err = _change_during_run(tmp_path, lambda p: p.rename(p.with_suffix(".moved")))
    assert "source file disappeared during the conversion" in str(err)


def test_source_changed_between_plan_and_resume(tmp_path: Path) -> None:
    """A run interrupted, then the source replaced: the resume starts over instead of mixing old and new shards."""
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    out = tmp_path / "out"
    stop = {"n": 0}

    def interrupt(done: int, total: int) -> None:
        stop["n"] += 1
        if stop["n"] == 60:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP, workers=1, progress=interrupt)
    assert json.loads((rh.partial_of(out) / "fmtconv-manifest.json").read_text())["shards"]
    other = rh.copy_fixture(rh.V3, tmp_path / "other")
    shutil.rmtree(src)
    shutil.copytree(other, src)
    convert(src, out, recipe="q4q8", max_shard_bytes=CAP)
    ref = tmp_path / "ref"
    convert(other, ref, recipe="q4q8", max_shard_bytes=CAP)
    assert _weights(out) == _weights(ref)
