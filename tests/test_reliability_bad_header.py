"""Reliability class 2: header length larger than the file, header not JSON, header JSON of the wrong shape."""

from __future__ import annotations

from pathlib import Path

import reliability_helpers as rh

SHARD = "model-00001-of-00002.safetensors"


def test_header_length_beyond_file_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    shard = src / SHARD
    header, data = rh.read_raw(shard)
    size = shard.stat().st_size
    rh.write_raw(shard, header, data, header_len=size * 4)
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["mxfp4-to-affine", src, out, "--quiet"], SHARD, f"header length {size * 4} exceeds the file size")


def test_header_length_huge_api(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    header, data = rh.read_raw(src / SHARD)
    rh.write_raw(src / SHARD, header, data, header_len=2**64 - 1)
    rh.api_refuses(src, tmp_path / "out", SHARD, "header length")


def test_header_not_json(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    _, data = rh.read_raw(src / SHARD)
    rh.write_raw(src / SHARD, b'{"embed.weight": {"dtype": "BF16", ' + b"\xff\xfe garbage", data)
    rh.api_refuses(src, tmp_path / "out", SHARD, "header is not well-formed UTF-8 JSON")
    rh.write_raw(src / SHARD, b'{"a": [1, 2,,]}   ', data)
    rh.api_refuses(src, tmp_path / "out", SHARD, "header is not well-formed UTF-8 JSON")


def test_header_json_of_wrong_shape(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    header, data = rh.read_raw(src / SHARD)
    name = next(k for k in header if k != "__metadata__")
    cases = [
        (b"[1, 2, 3]", "header must be a JSON object, got list"),
        (b'"just a string"', "header must be a JSON object, got str"),
        ({**header, name: [1, 2]}, "entry must be an object with dtype, shape, data_offsets"),
        ({**header, name: {"dtype": "BF16", "shape": [2]}}, "data_offsets must be [begin, end] integers"),
        ({**header, name: {**header[name], "shape": "256x128"}}, "shape must be a list of non-negative integers"),
        ({**header, name: {**header[name], "shape": [-1, 128]}}, "shape must be a list of non-negative integers"),
        ({**header, name: {**header[name], "data_offsets": [0]}}, "data_offsets must be [begin, end] integers"),
        ({**header, "__metadata__": {"format": 3}}, "__metadata__ must be an object of string to string"),
    ]
    for k, (bad, needle) in enumerate(cases):
        rh.write_raw(src / SHARD, bad, data)
        err = rh.api_refuses(src, tmp_path / f"out{k}", SHARD, needle)
        if isinstance(bad, dict) and "__metadata__" not in needle:
            assert err.tensor == name, err
