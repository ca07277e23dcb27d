"""Reliability class 13: two conversions into the same OUT at once: the second refuses (flock on
OUT.partial/.fmtconv.lock) instead of interleaving, and the first finishes with the right bytes."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import reliability_helpers as rh
from fmtconv.convert import convert
from fmtconv.convert.pipeline import LOCK
from fmtconv.errors import FmtconvError

CAP = 40_000


class PausedConversion:
    """A conversion run in a thread that stops (holding its lock) at its first progress report until released."""

    def __init__(self, src: Path, out: Path):
        self.paused, self.go = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.result = None

        def progress(done: int, total: int) -> None:
            self.paused.set()
            assert self.go.wait(60)

        def run() -> None:
            try:
                self.result = convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP, progress=progress)
            except BaseException as e:  # noqa: BLE001 - handed to the test
                self.error = e

        self.thread = threading.Thread(target=run)

    def __enter__(self) -> "PausedConversion":
        self.thread.start()
        assert self.paused.wait(60), "the first conversion never started writing"
        return self

    def __exit__(self, *exc) -> None:
        self.go.set()
        self.thread.join(60)


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    base = tmp_path_factory.mktemp("lock")
    src = rh.copy_fixture(rh.V4, base / "src")
    ref = base / "ref" / "out"
    convert(src, ref, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP)
    return src, rh.tree_bytes(ref)


def test_second_conversion_refuses_cli(tmp_path: Path, expected) -> None:
    src, want = expected
    before = rh.tree_hashes(src)
    out = tmp_path / "out"
    with PausedConversion(src, out) as first:
        snapshot = sorted(p.name for p in rh.partial_of(out).iterdir())  # (in-flight blocks of the first still land)
        proc = rh.run_cli("mxfp4-to-affine", src, out, "--quiet", "--max-shard-size", "40KB")
        rh.assert_cli_refuses(proc, f"{out}.partial", "another fmtconv conversion is writing into this output (lock held)")
        assert sorted(p.name for p in rh.partial_of(out).iterdir()) == snapshot  # the refused run removed nothing
        assert not out.exists()
    assert first.error is None, first.error
    assert rh.tree_bytes(out) == want and not rh.partial_of(out).exists()
    assert rh.tree_hashes(src) == before


def test_second_conversion_refuses_api(tmp_path: Path, expected) -> None:
    src, want = expected
    out = tmp_path / "out"
    with PausedConversion(src, out) as first:
        with pytest.raises(FmtconvError, match=r"lock held"):
            convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP)
        with pytest.raises(FmtconvError, match=r"lock held"):  # --overwrite does not break the lock either
            convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP, overwrite=True)
        assert rh.partial_of(out).is_dir() and not out.exists()
    assert first.error is None, first.error
    assert rh.tree_bytes(out) == want


def test_stale_lock_file_does_not_block(tmp_path: Path, expected) -> None:
    """A lock file left by a killed run (no process holds the flock) is no obstacle."""
    src, want = expected
    out = tmp_path / "out"
    rh.partial_of(out).mkdir()
    (rh.partial_of(out) / LOCK).write_text("")
    convert(src, out, recipe=rh.mxfp4_recipe(), max_shard_bytes=CAP)
    assert rh.tree_bytes(out) == want
