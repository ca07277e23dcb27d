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


def test_runtime_override_writes_for_mlx_vlm_where_both_have_the_model(tmp_path):
    """qwen3_moe is mlx-lm's, and mlx-vlm wraps the same model under `language_model.`: --runtime mlx-vlm."""
    fixture = FIXTURES / "qwen3-moe-fp8-tiny"
    summary = convert(fixture, tmp_path / "vlm", recipe="q4q8", runtime="mlx-vlm", kernel_backend="cpu")
    assert all(c["ok"] and c["runtime"] == "mlx-vlm" for c in summary["conformance"])
    model = load_bundle(tmp_path / "vlm", "mlx-vlm")
    assert any(p.startswith("language_model.model.layers.0.mlp.switch_mlp") for p in module_settings(model))
    assert rel_rms(logits(model, tokens_for(fixture)), reference_logits(fixture.name)) < 0.5


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
