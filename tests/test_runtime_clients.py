"""Every fixture, converted with q4q8 and with a mixed recipe, loads in the runtime that owns its model_type
(mlx-vlm for deepseek_v4 and step3p7, mlx-lm for the rest), has the recipe's bits in every module, names
only real modules in its config, and gives logits within 1.25x the error of MLX's own quantization of the
exactly decoded weights at the same per-module settings."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from fmtconv.convert import convert, plan
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.errors import FmtconvError
from runtime_helpers import CLIENTS, FIXTURES, baseline_model, load_bundle, logits, module_settings, rel_rms, tokens_for

RECIPES = ("q4q8", "mixed_4_6")
CASES = [pytest.param(name, recipe, id=f"{name}-{recipe}") for name in CLIENTS for recipe in RECIPES]


@functools.cache
def reference_logits(name: str) -> np.ndarray:
    """float32 logits of a fixture's exactly decoded weights in its runtime's model (computed once)."""
    fixture = FIXTURES / name
    return logits(CLIENTS[name][1](fixture), tokens_for(fixture))


@pytest.mark.parametrize("name,recipe", CASES)
def test_bundle_loads_in_its_runtime_with_the_recipe_bits_and_logits_gate(name, recipe, tmp_path):
    fixture = FIXTURES / name
    runtime = CLIENTS[name][0]
    p = plan(fixture, recipe)
    assert p.runtime == runtime
    summary = convert(fixture, tmp_path / "out", recipe=recipe, kernel_backend="cpu")
    assert [c["ok"] for c in summary["conformance"]] == [True, True]  # after planning, and before the rename
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["fmtconv"]["runtime"] == runtime and config["fmtconv"]["runtime_check"]["result"] == "passed"

    model = load_bundle(tmp_path / "out", runtime)
    settings = module_settings(model)
    intent = {t.target.module: {"bits": t.bits, "group_size": t.group_size, "mode": t.mode} for t in p.tensors if t.quantized}
    assert settings == intent  # every module the plan quantized, at its bits, and nothing else
    modules = {path for path, _ in model.named_modules()}
    assert all(k in modules for k, v in config["quantization"].items() if isinstance(v, dict))

    tokens = tokens_for(fixture)
    ref = reference_logits(name)
    got = logits(model, tokens)
    base = logits(baseline_model(fixture, settings), tokens)
    err, base_err = rel_rms(got, ref), rel_rms(base, ref)
    print(f"{name} {recipe} ({runtime}): logits rel RMS {err:.4f}, baseline {base_err:.4f}, ratio {err / base_err:.3f}")
    assert err <= 1.25 * base_err, (err, base_err)


@pytest.mark.parametrize("name", ["deepseek-v3-fp8-tiny", "gpt-oss-tiny", "step3p5-mxfp4-tiny", "glm4-moe-lite-fp8-tiny",
                                  "qwen3-moe-fp8-tiny"])
def test_runtime_override_writes_for_mlx_vlm_where_both_have_the_model(name, tmp_path):
    """mlx-lm owns these, and mlx-vlm wraps the same model under `language_model.`: --runtime mlx-vlm."""
    fixture = FIXTURES / name
    summary = convert(fixture, tmp_path / "vlm", recipe="q4q8", runtime="mlx-vlm", kernel_backend="cpu")
    assert all(c["ok"] and c["runtime"] == "mlx-vlm" for c in summary["conformance"])
    model = load_bundle(tmp_path / "vlm", "mlx-vlm")
    assert module_settings(model) and all(p.startswith("language_model.") for p in module_settings(model))
    assert rel_rms(logits(model, tokens_for(fixture)), reference_logits(fixture.name)) < 0.5


def test_mlx_vlm_has_its_own_deepseek_v41_port_so_the_override_is_refused():
    with pytest.raises(FmtconvError, match="no mlx-vlm layout for model_type 'deepseek_v41'"):
        plan(FIXTURES / "deepseek-v4-tiny", "q4q8", runtime="mlx-vlm")


def test_a_rule_naming_the_vision_tower_quantizes_it_and_mlx_vlm_loads_it(tmp_path):
    fixture = FIXTURES / "step3p7-nvfp4-tiny"
    recipe = recipe_from_dict({"name": "vision8", "rules": [
        {"match": r"^(vision_model|vit_large_projector)\b", "mode": "affine", "bits": 8},
        {"match": "switch_mlp", "mode": "affine", "bits": 4}, {"mode": "affine", "bits": 8}]})
    default = plan(fixture, "q4q8")
    assert not any(t.quantized for t in default.tensors if t.target.name.startswith(("vision_model.", "vit_large_projector.")))
    convert(fixture, tmp_path / "out", recipe=recipe, kernel_backend="cpu")
    settings = module_settings(load_bundle(tmp_path / "out", "mlx-vlm"))
    assert settings["vit_large_projector"]["bits"] == 8
    assert settings["vision_model.transformer.0.attn.in_proj"]["bits"] == 8 and "vision_model.conv1" not in settings


def test_the_source_itself_reads_in_mlx_vlm_as_the_decoded_reference(tmp_path):
    """The fixture cross-checked with mlx-vlm's own reader (MXFP4 -> mxfp4, FP8 -> mxfp8, exact) against the
    independently decoded reference.  mlx-vlm 0.7.10's generic FP8 transform claims the checkpoint and would give
    the MXFP4 experts mxfp8, so the config names the model's own make_quantization_config, as its docs do."""
    import shutil

    import fixture_lib as fl
    from mlx_vlm.models.deepseek_v4.language import make_quantization_config

    fixture = FIXTURES / "deepseek-v4-flash-tiny"
    src = tmp_path / "src"
    shutil.copytree(fixture, src)
    config = json.loads((src / "config.json").read_text())
    config["quantization"] = make_quantization_config(fl.vlm_model(config))
    (src / "config.json").write_text(json.dumps(config))
    assert rel_rms(logits(load_bundle(src, "mlx-vlm"), tokens_for(fixture)), reference_logits(fixture.name)) < 1e-4
