"""Reliability class 1: a truncated shard (data area shorter than its header says) is refused up front."""

from __future__ import annotations

import os
from pathlib import Path

import reliability_helpers as rh


def _truncate(path: Path, drop: int) -> None:
    os.truncate(path, path.stat().st_size - drop)


def test_truncated_shard_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    shard = src / "model-00002-of-00002.safetensors"
    _truncate(shard, 1000)
    out = tmp_path / "out"
    err = rh.cli_refuses(src, out, ["mxfp4-to-affine", src, out, "--quiet"], shard.name, "outside the data area")
    assert "tensor '" in err  # the last tensor of the shard is the one whose bytes are cut off


def test_truncated_by_one_byte_api(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    shard = src / "model-00001-of-00002.safetensors"
    _truncate(shard, 1)
    rh.api_refuses(src, tmp_path / "out", shard.name, "outside the data area", "tensor '")


def test_truncated_inside_header_api(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    shard = src / "model-00001-of-00002.safetensors"
    os.truncate(shard, 8 + 20)  # the JSON header itself is cut
    rh.api_refuses(src, tmp_path / "out", shard.name, "header length")
    os.truncate(shard, 5)  # not even the 8-byte length
    rh.api_refuses(src, tmp_path / "out2", shard.name, "shorter than the 8-byte header length")
