"""`--runtime vmlx` for DeepSeek-V4 without vMLX installed: the stored names, the quantization block keyed by jang's
module paths, recipes matched against those paths, verify and the card, and the refusals.  (The same bundles against
vMLX's own loader: tests/test_vmlx_client.py, in .ci/run's vMLX environment.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings

import pytest

from fmtconv.convert import convert, plan
from fmtconv.convert.check.verify import verify_bundle
from fmtconv.convert.layouts import all_layouts, layout_for
from fmtconv.convert.layouts.deepseek_v4_vmlx import DeepseekV4VmlxLayout, jang_name
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.errors import FmtconvError
from runtime_helpers import FIXTURES

pytestmark = pytest.mark.vmlx
V4 = FIXTURES / "deepseek-v4-flash-tiny"

# Stored name -> jang's parameter path (jang_tools/dsv4/mlx_model.py Model.sanitize), one per rename rule.
RENAMES = {
    "embed.weight": "model.embed.weight",
    "embed.scales": "model.embed.scales",
    "head.weight": "lm_head.weight",
    "head.biases": "lm_head.biases",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head_fn",
    "layers.2.attn_norm.weight": "model.layers.2.input_layernorm.weight",
    "layers.2.ffn_norm.weight": "model.layers.2.post_attention_layernorm.weight",
    "layers.0.hc_attn_scale": "model.layers.0.hc_attn_scale",
    "layers.1.attn.wq_a.scales": "model.layers.1.self_attn.wq_a.scales",
    "layers.1.attn.wo_a.weight": "model.layers.1.self_attn.wo_a.weight",
    "layers.1.attn.attn_sink": "model.layers.1.self_attn.attn_sink",
    "layers.1.attn.indexer.compressor.ape": "model.layers.1.self_attn.indexer.compressor.ape",
    "layers.0.ffn.gate.tid2eid": "model.layers.0.mlp.gate.tid2eid",
    "layers.1.ffn.gate.bias": "model.layers.1.mlp.gate.bias",
    "layers.1.ffn.shared_experts.w1.weight": "model.layers.1.mlp.shared_experts.gate_proj.weight",
    "layers.1.ffn.shared_experts.w2.biases": "model.layers.1.mlp.shared_experts.down_proj.biases",
    "layers.1.ffn.shared_experts.w3.scales": "model.layers.1.mlp.shared_experts.up_proj.scales",
    "layers.1.ffn.switch_mlp.down_proj.weight": "model.layers.1.mlp.switch_mlp.down_proj.weight",
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("vmlx") / "v4-vmlx"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", RuntimeWarning)
        summary = convert(V4, out, recipe="q4q8", runtime="vmlx", kernel_backend="cpu")
    return out, summary, [str(w.message) for w in seen]


@pytest.fixture(scope="module")
def bundle(converted):
    return converted[0]


def test_the_runtime_check_runs_against_jang_or_says_why_not(converted):
    _, summary, seen = converted
    checks = summary["conformance"]
    assert [c["model_module"] for c in checks] == ["jang_tools.dsv4.mlx_model"] * 2
    if importlib.util.find_spec("jang_tools") is None:  # the main environments: warned, not silently passed
        assert all(c["skipped"].startswith("vmlx is not installed (jang_tools not importable)") for c in checks)
        assert any("vmlx is not installed" in w for w in seen)
    else:
        assert all(c["ok"] for c in checks) and not any("vmlx" in w for w in seen)


def test_rename_table():
    assert {k: jang_name(k) for k in RENAMES} == RENAMES


def test_stored_names_are_the_release_names_with_experts_stacked():
    p = plan(V4, "q4q8", runtime="vmlx")
    assert isinstance(p.layout, DeepseekV4VmlxLayout) and p.runtime == "vmlx"
    assert p.model_module == "jang_tools.dsv4.mlx_model"
    names = {t.target.name: t for t in p.tensors}
    assert not any(n.startswith(("model.", "language_model.", "lm_head")) or ".experts." in n for n in names)
    assert {"embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.ffn.gate.tid2eid"} <= set(names)
    stacked = names["layers.2.ffn.switch_mlp.up_proj.weight"]
    assert [g.name for g in stacked.target.sources] == [f"layers.2.ffn.experts.{e}.w3.weight" for e in range(4)]
    config = json.loads((V4 / "config.json").read_text())
    wo_a = names["layers.0.attn.wo_a.weight"]
    assert wo_a.shape == (config["o_groups"] * config["o_lora_rank"], config["num_attention_heads"] * config["head_dim"] // config["o_groups"])
    tid = names["layers.0.ffn.gate.tid2eid"]
    assert [s.dtype for s in tid.parts] == ["I32"]  # jang's Gate declares the hash table int32
    assert {names[n].parts[0].dtype for n in ("layers.0.hc_attn_fn", "hc_head_scale", "layers.1.attn.attn_sink", "layers.1.ffn.gate.bias",
                                              "layers.1.attn.compressor.ape")} == {"F32"}  # as jang's converter keeps them
    assert p.dropped and all(n.startswith("mtp.") for n in p.dropped)


def test_the_quantization_block_names_every_module_at_its_runtime_path(bundle):
    config = json.loads((bundle / "config.json").read_text())
    q = config["quantization"]
    assert q == config["quantization_config"] and (q["bits"], q["group_size"], q["mode"]) == (8, 64, "affine")
    modules = {k: v for k, v in q.items() if isinstance(v, dict)}
    index = json.loads((bundle / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {n.removesuffix(".scales") for n in index if n.endswith(".scales")}
    assert set(modules) == {jang_name(f"{m}.weight").removesuffix(".weight") for m in stored}
    assert {"model.embed", "lm_head", "model.layers.1.self_attn.wq_a", "model.layers.1.self_attn.indexer.compressor.wkv"} <= set(modules)
    assert {k: v["bits"] for k, v in modules.items() if ".mlp.switch_mlp." in k} == {
        f"model.layers.{i}.mlp.switch_mlp.{p}_proj": 4 for i in range(3) for p in ("gate", "up", "down")}
    assert "jang" not in config and not (bundle / "jang_config.json").exists()
    assert config["fmtconv"]["runtime"] == "vmlx" and config["fmtconv"]["layout"] == "deepseek_v4"


def test_recipe_rules_match_the_runtime_paths():
    recipe = recipe_from_dict({"name": "paths", "rules": [
        {"match": r"\.mlp\.switch_mlp\.down_proj$", "layers": "i == 1", "mode": "affine", "bits": 6},
        {"match": r"self_attn\.wq_a$", "mode": "affine", "bits": 5, "group_size": 32},
        {"match": r"^lm_head$", "mode": "affine", "bits": 6},
        {"match": r"ffn\.experts", "mode": "affine", "bits": 2},  # the stored names: matches nothing
        {"mode": "affine", "bits": 4}]})
    p = plan(V4, recipe, runtime="vmlx")
    bits = {t.runtime_module: (t.bits, t.group_size) for t in p.tensors if t.quantized}
    assert bits["model.layers.1.mlp.switch_mlp.down_proj"] == (6, 64) and bits["model.layers.0.mlp.switch_mlp.down_proj"] == (4, 64)
    assert bits["model.layers.2.self_attn.wq_a"] == (5, 32) and bits["lm_head"] == (6, 64)
    assert "recipe rule match 'ffn\\\\.experts' selects no module" in p.warnings
    assert p.quantization()["model.layers.2.self_attn.wq_a"] == {"group_size": 32, "bits": 5, "mode": "affine"}


def test_verify_reads_the_runtime_keys_and_compares_with_the_source(bundle):
    report = verify_bundle(bundle)
    assert report.ok, report.problems
    quantized = {m.name: m.bits for m in report.modules if m.quantized}
    assert quantized["layers.0.ffn.switch_mlp.gate_proj"] == 4 and quantized["head"] == 8 and len(quantized) == 43
    run = subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", "verify", str(bundle), "--source", str(V4), "--json"],
                         capture_output=True, text=True)
    out = json.loads(run.stdout)
    assert run.returncode == 0 and out["ok"], out["problems"]
    kinds = {s["pattern"]: s for s in out["summary"]["patterns"]}
    assert kinds["layers.{i}.ffn.switch_mlp.gate_proj"]["count"] == 3  # the stacked experts met their sources
    assert kinds["head"]["kind"] == "8-bit affine" and kinds["layers.{i}.hc_attn_fn"]["kind"] == "float32"


def test_verify_flags_a_key_that_names_no_runtime_module(bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    config = json.loads((bad / "config.json").read_text())
    q = config["quantization"]
    q["layers.0.ffn.switch_mlp.gate_proj"] = q.pop("model.layers.0.mlp.switch_mlp.gate_proj")  # keyed by the stored name
    config["quantization_config"] = q
    (bad / "config.json").write_text(json.dumps(config))
    problems = verify_bundle(bad).problems
    assert problems[0] == ("config.json: quantization override 'layers.0.ffn.switch_mlp.gate_proj' names no module: no stored "
                           "tensor is renamed to it by the runtime's sanitize")
    # and the experts fall back to the 8-bit default: the founding failure, caught on the shapes
    assert "tensor 'layers.0.ffn.switch_mlp.gate_proj.weight': shape [4, 256, 16] does not fit affine bits=8" in problems[1]
    assert len(problems) == 2


def test_the_card_names_vmlx_and_shows_its_usage(bundle):
    card = (bundle / "README.md").read_text()
    assert "| Runtime | vmlx (`jang_tools.dsv4.mlx_model`)" in card
    assert "pip install vmlx" in card and "vmlx serve path/to/this/folder" in card
    assert "from vmlx_engine.utils.tokenizer import load_model_with_fallback" in card


def test_the_plan_command_shows_runtime_paths():
    run = subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", "plan", str(V4), "--runtime", "vmlx", "--json"],
                         capture_output=True, text=True)
    out = json.loads(run.stdout)
    assert out["runtime"] == "vmlx" and out["model_module"] == "jang_tools.dsv4.mlx_model"
    rows = {r["pattern"]: r["runtime_path"] for r in out["table"]}
    assert rows["layers.{i}.ffn.shared_experts.w2.weight"] == "model.layers.{i}.mlp.shared_experts.down_proj"
    assert rows["layers.{i}.hc_attn_fn"] == "model.layers.{i}.hc_attn_fn"
    assert {t["name"]: t["module"] for t in out["tensors"]}["head.weight"] == "lm_head"


@pytest.mark.parametrize("name", ["qwen3-moe-fp8-tiny", "step3p7-nvfp4-tiny", "deepseek-v4-tiny"])
def test_vmlx_for_another_model_type_is_refused_before_writing(name, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", "mxfp4-to-affine", str(FIXTURES / name), str(out),
                          "--runtime", "vmlx"], capture_output=True, text=True)
    assert run.returncode != 0 and not out.exists() and not (tmp_path / "out.partial").exists()
    model_type = json.loads((FIXTURES / name / "config.json").read_text())["model_type"]
    assert f"fmtconv has no vmlx layout for model_type {model_type!r}" in run.stderr
    assert "fmtconv writes vmlx bundles only for model_type deepseek_v4" in run.stderr
    owners = {"qwen3_moe": "mlx-lm (the default) or mlx-vlm (--runtime mlx-vlm)", "step3p7": "mlx-vlm (the default)",
              "deepseek_v41": "mlx-lm (the default)"}
    assert f"is loaded by {owners[model_type]}" in run.stderr


def test_the_default_for_deepseek_v4_stays_mlx_vlm():
    assert layout_for({"model_type": "deepseek_v4"}).runtime == "mlx-vlm"
    assert layout_for({"model_type": "deepseek_v4"}, family="deepseek_v4").runtime == "mlx-vlm"
    assert plan(V4, "q4q8").runtime == "mlx-vlm"
    with pytest.raises(FmtconvError, match=r"'deepseek_v4' is loaded by mlx-vlm \(the default\) or vmlx \(--runtime vmlx\)"):
        plan(V4, "q4q8", runtime="mlx-lm")


def test_every_other_layout_stores_the_runtime_names():
    for cls in all_layouts():
        if cls is not DeepseekV4VmlxLayout:
            assert cls().runtime_name("model.layers.0.mlp.gate.weight") == "model.layers.0.mlp.gate.weight"
