"""Reliability class 14: an input dimension not divisible by the group size. A rule with
on_indivisible = "error" (the default for user rules) refuses, naming the tensor, the dimension and the rule;
on_indivisible = "keep" (what the presets use) keeps that tensor dense in the compute dtype, warns, and the
bundle still loads in mlx_lm with that module unquantized."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import reliability_helpers as rh
from fmtconv.convert import convert
from fmtconv.formats.safetensors_io import Checkpoint

RULE = '[[rules]]\nmode = "affine"\nbits = 4\ngroup_size = 64\n'


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A dense llama whose MLP is 96 wide: down_proj has 96 inputs, not a multiple of 64."""
    return rh.dense_source(tmp_path_factory.mktemp("indiv") / "src", inter=96)


def test_indivisible_errors_by_default_cli(src: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RULE)
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["convert", src, out, "--recipe", recipe, "--quiet"], "tensor 'model.layers.0.mlp.down_proj.weight'",
                   "input dimension 96 is not divisible by group size 64", "on_indivisible = \"keep\"")
    rh.assert_cli_refuses(rh.run_cli("plan", src, "--recipe", recipe), "input dimension 96")  # found before writing


def test_indivisible_explicit_error_api(src: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"rules": [{"match": "mlp", "mode": "affine", "bits": 8, "group_size": 128, "on_indivisible": "error"}]}))
    rh.api_refuses(src, tmp_path / "out", "tensor 'model.layers.0.mlp.down_proj.weight'", "not divisible by group size 128",
                   "rule match 'mlp'", recipe=recipe)


def test_indivisible_keep_fallback(src: Path, tmp_path: Path) -> None:
    from mlx_lm.utils import load_model

    recipe = tmp_path / "r.toml"
    recipe.write_text(RULE + 'on_indivisible = "keep"\n')
    out = tmp_path / "out"
    result = convert(src, out, recipe=recipe, kernel_backend="cpu")
    assert any("down_proj: input dim 96 is not divisible by group size 64; kept in bfloat16" in w for w in result["warnings"])
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}
    with Checkpoint(src) as s, Checkpoint(out) as o:
        for i in range(2):
            name = f"model.layers.{i}.mlp.down_proj"
            assert f"{name}.scales" not in o.tensors and o.info(f"{name}.weight").dtype == "BF16"
            assert o.raw(f"{name}.weight").tobytes() == s.raw(f"{name}.weight").tobytes()
            assert o.info(f"model.layers.{i}.mlp.up_proj.weight").dtype == "U32"  # 4-bit affine
    model, _ = load_model(out)
    modules = dict(model.named_modules())
    assert type(modules["model.layers.0.mlp.down_proj"]).__name__ == "Linear"
    assert type(modules["model.layers.0.mlp.up_proj"]).__name__ == "QuantizedLinear"
    import mlx.core as mx

    logits = np.array(model(mx.array([[1, 2, 3]])).astype(mx.float32))
    assert np.isfinite(logits).all()
