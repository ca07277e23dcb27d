"""Reliability class 7: an FP8 weight without its scale, a scale of the wrong shape, an MXFP4 packed
length inconsistent with its scale count."""

from __future__ import annotations

import json
from pathlib import Path

import reliability_helpers as rh
from fmtconv.formats.safetensors_io import INDEX_NAME


def _drop_tensor(src: Path, name: str) -> None:
    rh.edit_header(rh.shard_of(src, name), lambda h: h.pop(name))
    idx = json.loads((src / INDEX_NAME).read_text())
    idx["weight_map"].pop(name)
    (src / INDEX_NAME).write_text(json.dumps(idx))


def test_fp8_weight_without_scale_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    _drop_tensor(src, "model.layers.0.mlp.down_proj.weight_scale_inv")
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["fp8-to-affine", src, out, "--quiet"], "tensor 'model.layers.0.mlp.down_proj.weight'",
                   "F8_E4M3 weight without a scale", "weight_scale_inv")


def test_fp8_e8m0_weight_without_scale(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    _drop_tensor(src, "layers.0.attn.wq_a.scale")
    rh.api_refuses(src, tmp_path / "out", "tensor 'layers.0.attn.wq_a.weight'", "without a scale")


def test_fp8_scale_of_wrong_shape(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"  # F32 (2, 3) for a (192, 320) weight, 128x128 blocks
    rh.edit_header(rh.shard_of(src, name), lambda h: h[name].update(shape=[3, 2]))
    rh.api_refuses(src, tmp_path / "out", f"tensor '{name}'", "FP8 scale: shape (3, 2) fits no block of weight (192, 320)",
                   "expected (2, 3)")


def test_orphan_scale_without_weight(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    _drop_tensor(src, "model.layers.0.mlp.down_proj.weight")
    rh.api_refuses(src, tmp_path / "out", "tensor 'model.layers.0.mlp.down_proj.weight_scale_inv'", "no format claims")


def test_mxfp4_packed_length_inconsistent_with_scales(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    w = "layers.0.ffn.experts.1.w1.weight"  # I8 (64, 64): 128 FP4 inputs per row, scale E8M0 (64, 4)
    shard = rh.shard_of(src, w)

    def shrink(h: dict) -> None:  # a consistent header whose packed rows hold 96 inputs, not 128
        b = h[w]["data_offsets"][0]
        h[w].update(shape=[64, 48], data_offsets=[b, b + 64 * 48])

    rh.edit_header(shard, shrink)
    rh.api_refuses(src, tmp_path / "out", f"tensor '{w.replace('.weight', '.scale')}'",
                   "MXFP4 (deepseek_v4) scale: expected shape (64, 3) for weight (64, 48), got (64, 4)")
