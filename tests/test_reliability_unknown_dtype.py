"""Reliability class 4: an unknown dtype string is refused, naming the file, the tensor and the dtype."""

from __future__ import annotations

from pathlib import Path

import reliability_helpers as rh

SHARD = "model-00002-of-00002.safetensors"


def _first_tensor(path: Path) -> str:
    header, _ = rh.read_raw(path)
    return next(k for k in header if k != "__metadata__")


def test_unknown_dtype_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    name = _first_tensor(src / SHARD)
    rh.edit_header(src / SHARD, lambda h: h[name].update(dtype="F8_E3M4"))
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["mxfp4-to-affine", src, out, "--quiet"], SHARD, f"tensor '{name}'", "unknown dtype 'F8_E3M4'")


def test_dtype_not_a_string_or_wrong_case(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    name = _first_tensor(src / SHARD)
    for k, dtype in enumerate(("bf16", "", 16)):
        rh.edit_header(src / SHARD, lambda h, d=dtype: h[name].update(dtype=d))
        needle = "dtype must be a string" if not isinstance(dtype, str) else f"unknown dtype {dtype!r}"
        rh.api_refuses(src, tmp_path / f"out{k}", SHARD, f"tensor '{name}'", needle)
