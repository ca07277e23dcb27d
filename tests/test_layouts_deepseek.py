"""DeepSeek-V4 / V3 layouts against the installed mlx_lm: names, stacking, transforms, quantizable set."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "fixtures"))

import fixture_lib as fl  # noqa: E402

from fmtconv.convert.layouts import layout_for  # noqa: E402
from fmtconv.convert.layouts.deepseek_v3 import DeepseekV3Layout  # noqa: E402
from fmtconv.convert.layouts.deepseek_v4 import DeepseekV4Layout  # noqa: E402
from fmtconv.convert.layouts.deepseek_v41 import DeepseekV41Layout, mlx_name  # noqa: E402
from fmtconv.errors import FmtconvError  # noqa: E402
from fmtconv.formats.base import SourceGroup  # noqa: E402
from fmtconv.formats.grouping import find_groups  # noqa: E402
from fmtconv.formats.safetensors_io import Checkpoint  # noqa: E402

V4 = ROOT / "fixtures" / "deepseek-v4-tiny"
V3 = ROOT / "fixtures" / "deepseek-v3-fp8-tiny"
FIXTURES = [pytest.param(V4, DeepseekV41Layout, id="v4"), pytest.param(V3, DeepseekV3Layout, id="v3")]


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def _targets(d: Path):
    config = _config(d)
    with Checkpoint(d) as ckpt:
        groups = find_groups(ckpt.tensors, config)
    layout = layout_for(config)
    return layout, *layout.targets(groups, config)


def _model(config: dict):
    model_cls, args_cls = fl.model_classes(config)
    return model_cls(args_cls.from_dict(config))


@pytest.mark.parametrize("d,cls", FIXTURES)
def test_layout_is_chosen_by_model_type(d, cls):
    assert type(layout_for(_config(d))) is cls


def test_v4_model_types_go_to_the_runtime_that_owns_them():
    assert isinstance(layout_for({"model_type": "deepseek_v41"}), DeepseekV41Layout)
    v4 = layout_for({"model_type": "deepseek_v4"})
    assert isinstance(v4, DeepseekV4Layout) and v4.runtime == "mlx-vlm"
    with pytest.raises(FmtconvError, match="no mlx-lm layout for model_type 'deepseek_v4'"):
        layout_for({"model_type": "deepseek_v4"}, runtime="mlx-lm")


@pytest.mark.parametrize("model_type", ["deepseek_v3", "kimi_k2", "joyai_llm_flash"])
def test_v3_model_types(model_type):
    # mlx_lm.utils.MODEL_REMAPPING sends kimi_k2 and joyai_llm_flash to deepseek_v3.
    assert isinstance(layout_for({"model_type": model_type}), DeepseekV3Layout)


@pytest.mark.parametrize("d,cls", FIXTURES)
def test_targets_are_exactly_the_model_parameters(d, cls):
    _, targets, _ = _targets(d)
    names = [t.name for t in targets]
    assert len(names) == len(set(names))
    params = {k for k, _ in tree_flatten(_model(_config(d)).parameters())}
    assert set(names) == params


@pytest.mark.parametrize("d,cls", FIXTURES)
def test_quantizable_set_matches_modules_with_to_quantized(d, cls):
    _, targets, _ = _targets(d)
    model = _model(_config(d))
    runtime = {path for path, m in model.named_modules() if hasattr(m, "to_quantized") and "weight" in m}
    assert {t.module for t in targets if t.quantizable} == runtime
    # every quantizable target is the `.weight` of its module
    assert all(t.name.endswith(".weight") for t in targets if t.quantizable)


@pytest.mark.parametrize("d,cls", FIXTURES)
def test_uncast_matches_cast_predicate(d, cls):
    """The tensors the layout keeps in their stored dtype are those mlx_lm.convert does not cast."""
    model = _model(_config(d))
    names = [k for k, _ in tree_flatten(model.parameters())]
    assert [cls().keeps_source_dtype(k) for k in names] == [not model.cast_predicate(k) for k in names]


def test_v4_drops_mtp_only():
    _, _, dropped = _targets(V4)
    with Checkpoint(V4) as ckpt:
        mtp_groups = {g.name for g in find_groups(ckpt.tensors, _config(V4)) if g.name.startswith("mtp.")}
    assert mtp_groups and set(dropped) == mtp_groups


def test_v4_experts_stacked_in_expert_order():
    _, targets, _ = _targets(V4)
    t = {t.name: t for t in targets}["model.layers.1.mlp.experts.switch_mlp.down_proj.weight"]
    assert [g.name for g in t.sources] == [f"layers.1.ffn.experts.{e}.w2.weight" for e in range(4)]
    assert t.quantizable


@pytest.mark.parametrize("d,cls", FIXTURES)
def test_same_as_mlx_lm_sanitize_on_dense_weights(d, cls):
    """Running the model's own sanitize() on the dense published weights gives our names and values."""
    _, targets, _ = _targets(d)
    dense = fl.decode_fixture_dense(d)
    model = _model(_config(d))
    sanitized = model.sanitize({k: mx.array(v) for k, v in dense.items()})
    assert set(sanitized) == {t.name for t in targets}
    for t in targets:
        parts = [dense[g.name] for g in t.sources]
        if t.rows is not None:
            parts = [p[..., slice(*t.rows), :] for p in parts]
        if t.transform is not None:
            parts = [t.transform(p) for p in parts]
        ours = parts[0] if len(parts) == 1 else np.stack(parts)
        np.testing.assert_array_equal(ours, np.array(sanitized[t.name]), err_msg=t.name)


def test_v4_rename_table_matches_published_examples():
    # Names from DeepSeek-V4-Flash's safetensors headers -> deepseek_v41._rename.
    cases = {
        "embed.weight": "model.embed_tokens.weight",
        "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight",
        "layers.0.attn.wq_a.weight": "model.layers.0.self_attn.q_a_proj.weight",
        "layers.0.attn.q_norm.weight": "model.layers.0.self_attn.q_a_norm.weight",
        "layers.0.attn.attn_sink": "model.layers.0.self_attn.sinks",
        "layers.0.attn.compressor.wkv.weight": "model.layers.0.self_attn.compressor.kv_proj.weight",
        "layers.0.attn.indexer.wq_b.weight": "model.layers.0.self_attn.indexer.q_b_proj.weight",
        "layers.0.ffn.gate.bias": "model.layers.0.mlp.gate.e_score_correction_bias",
        "layers.0.ffn.shared_experts.w2.weight": "model.layers.0.mlp.shared_experts.down_proj.weight",
        "layers.0.hc_attn_base": "model.layers.0.attn_hc.base",
        "layers.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    }
    for pub, want in cases.items():
        assert mlx_name(pub) == want


def _g(name: str, shape=(4, 64)) -> SourceGroup:
    return SourceGroup(name=name, codec="dense", parts={"weight": name}, shape=shape)


def test_v4_missing_expert_is_an_error():
    config = {"model_type": "deepseek_v41", "n_routed_experts": 3, "o_groups": 1}
    groups = [_g(f"layers.0.ffn.experts.{e}.w1.weight") for e in (0, 2)]
    with pytest.raises(FmtconvError, match="missing \\[1\\]"):
        DeepseekV41Layout().targets(groups, config)


def test_v4_converted_names_pass_through():
    groups = [_g("model.layers.0.mlp.experts.switch_mlp.gate_proj.weight", (2, 4, 64)), _g("model.norm.weight", (64,))]
    targets, dropped = DeepseekV41Layout().targets(groups, {"model_type": "deepseek_v41"})
    assert [t.name for t in targets] == [g.name for g in groups] and not dropped
    assert [t.quantizable for t in targets] == [True, False]


def test_v4_output_config_keeps_model_type_drops_expert_dtype():
    cfg = DeepseekV41Layout().output_config({"model_type": "deepseek_v41", "expert_dtype": "fp4", "hidden_size": 8})
    assert cfg == {"model_type": "deepseek_v41", "hidden_size": 8}


def test_v3_drops_mtp_layer_and_rotary_freqs():
    config = {"num_hidden_layers": 2, "num_attention_heads": 1, "qk_nope_head_dim": 2, "n_routed_experts": 1}
    groups = [
        _g("model.layers.1.self_attn.o_proj.weight"),
        _g("model.layers.2.self_attn.o_proj.weight"),  # MTP layer (index == num_hidden_layers)
        _g("model.layers.0.self_attn.rotary_emb.inv_freq", (4,)),
    ]
    targets, dropped = DeepseekV3Layout().targets(groups, config)
    assert [t.name for t in targets] == ["model.layers.1.self_attn.o_proj.weight"]
    assert dropped == ["model.layers.2.self_attn.o_proj.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_v3_missing_expert_is_an_error():
    config = {"num_hidden_layers": 1, "num_attention_heads": 1, "qk_nope_head_dim": 2, "n_routed_experts": 2}
    with pytest.raises(FmtconvError, match="expected 0..1"):
        DeepseekV3Layout().targets([_g("model.layers.0.mlp.experts.1.up_proj.weight")], config)


# --- the fixtures themselves: published dtypes and shapes, sizes, determinism -------------------


def test_v4_fixture_stores_published_dtypes():
    with Checkpoint(V4) as ckpt:
        info = {n: (i.dtype, tuple(i.shape)) for n, i in ckpt.tensors.items()}
    cfg = _config(V4)
    h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
    assert info["layers.0.ffn.experts.0.w1.weight"] == ("I8", (inter, h // 2))
    assert info["layers.0.ffn.experts.0.w1.scale"] == ("F8_E8M0", (inter, h // 32))
    assert info["layers.0.ffn.experts.0.w2.weight"] == ("I8", (h, inter // 2))
    assert info["layers.0.attn.wq_a.weight"] == ("F8_E4M3", (cfg["q_lora_rank"], h))
    assert info["layers.0.attn.wq_a.scale"] == ("F8_E8M0", (1, 1))
    assert info["layers.0.attn.wo_b.scale"] == ("F8_E8M0", (1, 1))
    assert info["embed.weight"][0] == info["head.weight"][0] == info["layers.0.attn_norm.weight"][0] == "BF16"
    assert info["layers.0.hc_attn_fn"][0] == info["layers.0.attn.attn_sink"][0] == "F32"
    assert any(n.startswith("mtp.") for n in info)
    assert cfg["expert_dtype"] == "fp4"
    assert cfg["quantization_config"] == {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
    }


def test_v3_fixture_has_partial_fp8_blocks():
    with Checkpoint(V3) as ckpt:
        info = {n: (i.dtype, tuple(i.shape)) for n, i in ckpt.tensors.items()}
    w, s = info["model.layers.0.mlp.gate_proj.weight"], info["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    assert w == ("F8_E4M3", (320, 192)) and s == ("F32", (3, 2))
    assert any(d == "F8_E4M3" and (shape[0] % 128 or shape[1] % 128) for d, shape in info.values())
    assert info["model.layers.1.mlp.experts.3.down_proj.weight"][0] == "F8_E4M3"


@pytest.mark.parametrize("d", [V4, V3], ids=["v4", "v3"])
def test_fixture_is_small_with_side_files(d):
    assert fl.dir_size(d) < 1_500_000
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE", "chat_template.jinja"):
        assert (d / f).is_file()
    assert len(list(d.glob("model-*-of-00002.safetensors"))) == 2


def test_fixtures_regenerate_byte_identical(tmp_path):
    import family_deepseek

    for name, make in family_deepseek.FIXTURES.items():
        out = make(tmp_path / name)
        for f in sorted((ROOT / "fixtures" / name).iterdir()):
            assert (out / f.name).read_bytes() == f.read_bytes(), f"{name}/{f.name} differs from a fresh regeneration"


def test_fixture_mxfp4_packing_matches_mlx():
    """fixture_lib's MXFP4 bytes (DeepSeek's low-nibble-first order) decode the same under MLX's mxfp4."""
    w = fl.normal(fl.rng_for("mx"), (8, 64), 1.0)
    packed, scales = fl.quantize_mxfp4(w)
    ref = fl.dequantize_mxfp4(packed, scales)
    got = mx.dequantize(mx.array(packed.view(np.uint32)), mx.array(scales.view(np.uint8)), group_size=32, bits=4,
                        mode="mxfp4", dtype=mx.float32)
    np.testing.assert_array_equal(np.array(got), ref)
