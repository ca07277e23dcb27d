"""Reliability class 10: OUT equal to SRC, OUT inside SRC (or containing it), OUT existing without --overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

import reliability_helpers as rh
from fmtconv.convert import convert
from fmtconv.errors import FmtconvError


def test_out_equals_src_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    before = rh.tree_hashes(src)
    for out in (src, f"{src}/", src / ".." / "src"):
        rh.assert_cli_refuses(rh.run_cli("mxfp4-to-affine", src, out, "--quiet", "--overwrite"), "must not be the source directory")
    assert rh.tree_hashes(src) == before
    assert not rh.partial_of(src).exists()


def test_out_inside_src(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    for k, out in enumerate((src / "mlx", src / "a" / "b")):
        rh.api_refuses(src, out, str(out), "inside it", overwrite=bool(k))
        assert not out.parent.joinpath(out.name + ".partial").exists()
    link = tmp_path / "link"
    link.symlink_to(src)
    rh.api_refuses(src, link / "mlx", "inside it")  # through a symlink too


def test_out_containing_src(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "work" / "src")
    before = rh.tree_hashes(tmp_path / "work")
    with pytest.raises(FmtconvError, match="must not contain the source directory"):
        convert(src, tmp_path / "work", overwrite=True)
    assert rh.tree_hashes(tmp_path / "work") == before  # nothing replaced, nothing added
    assert not rh.partial_of(tmp_path / "work").exists()


def test_out_exists_without_overwrite_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before_src, before_out = rh.tree_hashes(src), rh.tree_hashes(out)
    rh.assert_cli_refuses(rh.run_cli("mxfp4-to-affine", src, out, "--quiet"), str(out), "output exists", "--overwrite")
    assert rh.tree_hashes(out) == before_out and rh.tree_hashes(src) == before_src
    assert not rh.partial_of(out).exists()
    # With --overwrite the old OUT is replaced by a complete bundle.
    convert(src, out, overwrite=True, kernel_backend="cpu")
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
