"""Recipes: validation errors point at the bad rule; presets agree with mlx_lm's own predicates."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.nn as nn
import pytest

from fmtconv.convert.recipes import PRESETS, load_recipe, recipe_from_dict
from fmtconv.errors import FmtconvError


def test_every_preset_validates_and_has_a_description() -> None:
    for name in PRESETS:
        r = load_recipe(name)
        assert r.name == name and r.description


@pytest.mark.parametrize(
    "rules, fragment",
    [
        ([{"mode": "fp16"}], "rule 1"),
        ([{"mode": "keep"}, {"mode": "affine", "bits": 7}], "rule 2 (affine.bits)"),
        ([{"mode": "affine", "bits": 4, "group_size": 48}], "group_size"),
        ([{"match": "(", "mode": "keep"}], "not a valid regular expression"),
        ([{"match": "x", "layers": "__import__('os')", "mode": "keep"}], "not allowed"),
        ([{"match": "x", "layers": "j < 3", "mode": "keep"}], "unknown name"),
        ([{"mode": "keep", "colour": "red"}], "colour"),
    ],
)
def test_bad_rules_are_named(rules, fragment) -> None:
    with pytest.raises(FmtconvError) as e:
        recipe_from_dict({"rules": rules}, "my.toml")
    assert fragment in str(e.value) and "my.toml" in str(e.value)


def test_toml_and_json_files(tmp_path: Path) -> None:
    (tmp_path / "r.toml").write_text(
        '[[rules]]\nmatch = "switch_mlp"\nmode = "affine"\nbits = 3\n\n[[rules]]\nmode = "affine"\nbits = 6\n'
    )
    r = load_recipe(tmp_path / "r.toml")
    assert r.name == "r"
    assert r.target_for("model.layers.1.mlp.switch_mlp.up_proj", "mxfp4", quantizable=True, num_layers=4).bits == 3
    assert r.target_for("model.layers.1.self_attn.o_proj", "dense", quantizable=True, num_layers=4).bits == 6
    (tmp_path / "r.json").write_text(json.dumps({"rules": [{"mode": "keep"}]}))
    assert load_recipe(tmp_path / "r.json").rules[0].mode == "keep"
    (tmp_path / "bad.toml").write_text("rules = [")
    with pytest.raises(FmtconvError, match="not valid TOML"):
        load_recipe(tmp_path / "bad.toml")
    with pytest.raises(FmtconvError, match="neither a preset"):
        load_recipe(tmp_path / "missing.toml")


def test_non_quantizable_tensors_skip_quantizing_rules() -> None:
    r = load_recipe("q4q8")
    assert r.target_for("model.layers.0.input_layernorm", "dense", quantizable=False, num_layers=2) is None
    drop = recipe_from_dict({"rules": [{"match": "^mtp", "mode": "drop"}, {"mode": "affine", "bits": 8}]})
    assert drop.target_for("mtp.0.norm", "dense", quantizable=False, num_layers=2).mode == "drop"


def test_source_condition_and_layer_expressions() -> None:
    r = load_recipe("dq4")
    t = lambda m: r.target_for(m, "mxfp4", quantizable=True, num_layers=40).bits  # noqa: E731
    assert t("model.layers.3.mlp.switch_mlp.down_proj") == 6
    assert t("model.layers.10.mlp.switch_mlp.down_proj") == 5
    assert t("model.layers.11.mlp.switch_mlp.down_proj") == 4
    assert t("model.layers.11.mlp.switch_mlp.gate_proj") == 4
    assert t("model.layers.11.self_attn.q_proj") == 8
    assert t("model.layers.10.mlp.switch_mlp.gate_proj") == 4
    assert t("model.layers.3.mlp.switch_mlp.up_proj") == 4
    assert t("model.layers.10.mlp.experts.down_proj") == 5  # gpt_oss names its SwitchGLU `experts`
    assert t("model.layers.10.mlp.shared_experts.down_proj") == 5  # shared experts count as experts (published DQ4 table)
    assert t("model.layers.11.mlp.share_expert.up_proj") == 4
    lossless = load_recipe("lossless-affine")
    assert lossless.target_for("model.layers.0.mlp.switch_mlp.up_proj", "mxfp4", quantizable=True, num_layers=2).exact
    assert not lossless.target_for("model.layers.0.self_attn.q_proj", "fp8_block", quantizable=True, num_layers=2).exact


def test_unused_patterns_are_reported() -> None:
    r = recipe_from_dict({"rules": [{"match": "experts_typo", "mode": "affine", "bits": 4}, {"mode": "affine", "bits": 8}]})
    assert r.unused_rules(["model.layers.0.mlp.switch_mlp.up_proj"]) == ["experts_typo"]


def _tiny_qwen3_moe():
    from mlx_lm.models import qwen3_moe

    args = qwen3_moe.ModelArgs(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=16, intermediate_size=128, num_attention_heads=4,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=64,
        rms_norm_eps=1e-6, vocab_size=128, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
        tie_word_embeddings=False, max_position_embeddings=512, norm_topk_prob=True,
    )
    return qwen3_moe.Model(args)


@pytest.mark.parametrize("preset", ["mixed_2_6", "mixed_3_4", "mixed_3_6", "mixed_4_6"])
def test_mixed_presets_equal_mlx_lm_predicates(preset: str) -> None:
    from mlx_lm.convert import mixed_quant_predicate_builder

    model = _tiny_qwen3_moe()
    predicate = mixed_quant_predicate_builder(preset, model, group_size=64)
    recipe = load_recipe(preset)
    n = len(model.layers)
    checked = 0
    for path, module in model.named_modules():
        if not hasattr(module, "to_quantized"):
            continue
        theirs = predicate(path, module)
        ours = recipe.target_for(path, "dense", quantizable=True, num_layers=n)
        assert {"group_size": ours.group_size, "bits": ours.bits, "mode": ours.mode} == theirs, path
        checked += 1
    assert checked > 50


def test_q4q8_matches_its_description_on_a_real_model() -> None:
    model = _tiny_qwen3_moe()
    recipe = load_recipe("q4q8")
    for path, module in model.named_modules():
        if isinstance(module, nn.Module) and hasattr(module, "to_quantized"):
            bits = recipe.target_for(path, "dense", quantizable=True, num_layers=16).bits
            assert bits == (4 if "switch_mlp" in path else 8), path
