"""Reliability class 3: tensor offsets out of range, overlapping, or not matching shape x dtype."""

from __future__ import annotations

from pathlib import Path

import reliability_helpers as rh

SHARD = "model-00001-of-00002.safetensors"


def _two_tensors(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def test_offsets_out_of_range_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    shard = src / SHARD
    header, data = rh.read_raw(shard)
    a, _ = _two_tensors(header)
    n = len(data)
    rh.edit_header(shard, lambda h: h[a].update(data_offsets=[n - 2, n + 6]))
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["fp8-to-affine", src, out, "--quiet"], SHARD, f"tensor '{a}'", "outside the data area")


def test_offsets_reversed_and_negative(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    shard = src / SHARD
    header, _ = rh.read_raw(shard)
    a, _ = _two_tensors(header)
    b0, b1 = header[a]["data_offsets"]
    for k, offsets in enumerate(([b1, b0], [-8, b1 - b0 - 8])):
        rh.edit_header(shard, lambda h, o=offsets: h[a].update(data_offsets=o))
        rh.api_refuses(src, tmp_path / f"out{k}", SHARD, f"tensor '{a}'", "outside the data area")


def test_offsets_overlapping(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    shard = src / SHARD
    header, _ = rh.read_raw(shard)
    a, b = _two_tensors(header)
    a0 = header[a]["data_offsets"][0]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    rh.edit_header(shard, lambda h: h[b].update(data_offsets=[a0 + 1, a0 + 1 + size]))  # b now starts inside a
    rh.api_refuses(src, tmp_path / "out", SHARD, f"tensor '{b}'", f"byte range overlaps that of tensor '{a}'")


def test_offsets_not_matching_shape_times_dtype(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    shard = src / SHARD
    header, _ = rh.read_raw(shard)
    a, _ = _two_tensors(header)
    shape = header[a]["shape"]
    rh.edit_header(shard, lambda h: h[a].update(shape=[shape[0] + 1, *shape[1:]]))
    rh.api_refuses(src, tmp_path / "out", SHARD, f"tensor '{a}'", "bytes but shape", "needs")
    rh.edit_header(shard, lambda h: h[a].update(shape=shape, dtype="F32" if h[a]["dtype"] != "F32" else "BF16"))
    rh.api_refuses(src, tmp_path / "out2", SHARD, f"tensor '{a}'", "bytes but shape")


def test_packed_fp4_shape_not_filling_bytes(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    shard = src / SHARD
    header, _ = rh.read_raw(shard)
    a, _ = _two_tensors(header)
    rh.edit_header(shard, lambda h: h[a].update(dtype="F4", shape=[3]))
    rh.api_refuses(src, tmp_path / "out", SHARD, f"tensor '{a}'", "does not fill whole bytes")


def test_shape_numpy_cannot_address(tmp_path: Path) -> None:
    """Zero-size tensors whose other axes are absurd, or more axes than NumPy handles, are refused by the parser."""
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    shard = src / SHARD
    header, _ = rh.read_raw(shard)
    a, _ = _two_tensors(header)
    rh.edit_header(shard, lambda h: h[a].update(shape=[0, 2**40, 2**40], data_offsets=[0, 0]))
    rh.api_refuses(src, tmp_path / "out", SHARD, f"tensor '{a}'", "too large to address")
    rh.edit_header(shard, lambda h: h[a].update(dtype="U8", shape=[1] * 40, data_offsets=[0, 1]))
    rh.api_refuses(src, tmp_path / "out2", SHARD, f"tensor '{a}'", "40 axes; at most 32")
