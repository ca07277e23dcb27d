"""Reliability class 8: E8M0 NaN code 255 in a scale; NaN/Inf in a float scale or a dense weight the recipe quantizes.

These are found while the shards are written; the run stops, OUT never appears and OUT.partial is removed
(nothing in it could be resumed: the source must change first, and that restarts the work)."""

from __future__ import annotations

import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import reliability_helpers as rh
from fmtconv.convert.recipes import Recipe


def test_e8m0_nan_in_mxfp4_scale_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    s = "layers.1.ffn.experts.2.w3.scale"
    rh.poke(rh.shard_of(src, s), s, 37, b"\xff")
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["mxfp4-to-affine", src, out, "--quiet", "--max-shard-size", "40KB"],
                   f"tensor '{s}'", "E8M0 scale code 255 (NaN) at flat index 37")


def test_e8m0_nan_in_fp8_block_scale(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    s = "layers.0.attn.wq_b.scale"
    rh.poke(rh.shard_of(src, s), s, 0, b"\xff")
    rh.api_refuses(src, tmp_path / "out", f"tensor '{s}'", "E8M0 scale code 255 (NaN)")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_float_scale(tmp_path: Path, value: float) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    s = "model.layers.1.self_attn.kv_b_proj.weight_scale_inv"
    rh.poke(rh.shard_of(src, s), s, 4, struct.pack("<f", value))
    rh.api_refuses(src, tmp_path / "out", f"tensor '{s}'", "FP8 float scale: non-finite value")


@pytest.mark.parametrize(("value", "mode"), [(float("nan"), "affine"), (float("inf"), "affine"), (float("nan"), "mxfp8")])
def test_nonfinite_dense_weight_to_quantize(tmp_path: Path, value: float, mode: str) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    w = "model.embed_tokens.weight"  # BF16; the recipe quantizes it
    rh.poke(rh.shard_of(src, w), w, 2 * 1000, np.array([value], dtype=ml_dtypes.bfloat16).tobytes())
    recipe = Recipe.model_validate({"rules": [{"mode": mode, **({"bits": 8} if mode == "affine" else {})}]})
    rh.api_refuses(src, tmp_path / "out", f"tensor '{w}'", "model-00001-of-00002.safetensors", "refuses inf/NaN input", recipe=recipe)


def test_nonfinite_dense_weight_kept_is_copied(tmp_path: Path) -> None:
    """A dense tensor the recipe keeps is the user's data, copied as it is (only quantizing needs finite values)."""
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    w = "model.norm.weight"
    rh.poke(rh.shard_of(src, w), w, 0, np.array([np.nan], dtype=ml_dtypes.bfloat16).tobytes())
    from fmtconv.convert import convert

    convert(src, tmp_path / "out", recipe="q4q8", kernel_backend="cpu", workers=1)
    assert (tmp_path / "out" / "config.json").exists()
