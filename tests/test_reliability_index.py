"""Reliability class 5: the index names a missing shard or a tensor not in its shard; shard tensors missing from the index."""

from __future__ import annotations

import json
from pathlib import Path

import reliability_helpers as rh
from fmtconv.formats.safetensors_io import INDEX_NAME


def _edit_index(src: Path, edit) -> None:
    idx = json.loads((src / INDEX_NAME).read_text())
    edit(idx)
    (src / INDEX_NAME).write_text(json.dumps(idx, indent=2))


def test_index_names_missing_shard_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    (src / "model-00002-of-00002.safetensors").unlink()
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["mxfp4-to-affine", src, out, "--quiet"], INDEX_NAME,
                   "index names shard 'model-00002-of-00002.safetensors', which is missing")


def test_index_names_tensor_not_in_its_shard(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    _edit_index(src, lambda i: i["weight_map"].update({"model.layers.0.mlp.ghost_proj.weight": "model-00001-of-00002.safetensors"}))
    rh.api_refuses(src, tmp_path / "out", INDEX_NAME, "tensor 'model.layers.0.mlp.ghost_proj.weight'", "that shard does not hold it")


def test_index_maps_tensor_to_the_wrong_shard(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    _edit_index(src, lambda i: i["weight_map"].update({"lm_head.weight": "model-00001-of-00002.safetensors"}))
    rh.api_refuses(src, tmp_path / "out", INDEX_NAME, "tensor 'lm_head.weight'", "maps it to model-00001-of-00002.safetensors")


def test_shard_tensor_missing_from_index(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    _edit_index(src, lambda i: i["weight_map"].pop("model.layers.0.mlp.down_proj.weight_scale_inv"))
    rh.api_refuses(src, tmp_path / "out", INDEX_NAME, "tensor 'model.layers.0.mlp.down_proj.weight_scale_inv'",
                   "the index does not list")


def test_index_not_json_or_without_weight_map(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    (src / INDEX_NAME).write_text('{"weight_map": {"a": ')
    rh.api_refuses(src, tmp_path / "out", INDEX_NAME, "index is not readable JSON")
    (src / INDEX_NAME).write_text('{"metadata": {}}')
    rh.api_refuses(src, tmp_path / "out2", INDEX_NAME, "no weight_map")


def test_index_nested_too_deep(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    (src / INDEX_NAME).write_text('{"weight_map": ' + "[" * 100_000)
    rh.api_refuses(src, tmp_path / "out", INDEX_NAME, "index is not readable JSON", "recursion")
