"""Layouts of gpt-oss, step3p5, glm4_moe_lite and qwen3_moe against mlx_lm's own sanitize().

For each fixture: the layout's targets, applied to the independently decoded dense weights, must
give exactly what the family's `Model.sanitize()` gives from the same weights in the release's
naming (same names, same values); `quantizable` must be set exactly on the modules of the
instantiated mlx_lm model that have `to_quantized`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from fmtconv.convert.layouts import layout_for
from fmtconv.convert.layouts.base import TargetTensor
from fmtconv.convert.layouts.gpt_oss import GptOssLayout
from fmtconv.convert.layouts.glm4_moe_lite import Glm4MoeLiteLayout
from fmtconv.convert.layouts.qwen3_moe import Qwen3MoeLayout, stacked_experts
from fmtconv.convert.layouts.step3p5 import Step3p5Layout
from fmtconv.errors import FmtconvError
from fmtconv.formats.base import SourceGroup
from fmtconv.formats.grouping import find_groups
from fmtconv.formats.safetensors_io import Checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
import family_others as fo  # noqa: E402
import fixture_lib as fl  # noqa: E402

LAYOUTS = {
    "gpt-oss-tiny": GptOssLayout,
    "step3p5-mxfp4-tiny": Step3p5Layout,
    "glm4-moe-lite-fp8-tiny": Glm4MoeLiteLayout,
    "qwen3-moe-fp8-tiny": Qwen3MoeLayout,
}
# Checkpoint names each family's sanitize() drops (MTP layers).
DROPPED_PREFIX = {"step3p5-mxfp4-tiny": "model.layers.3.", "glm4-moe-lite-fp8-tiny": "model.layers.2."}


def _config(name: str) -> dict:
    return json.loads((FIXTURES / name / "config.json").read_text())


def _apply(t: TargetTensor, dense: dict[str, np.ndarray]) -> np.ndarray:
    """What the converter writes for a target, from dense values by logical name (float32)."""
    vals = []
    for s in t.sources:
        v = dense[s.name]
        if t.transform is not None:
            v = t.transform(v)
        if t.rows is not None:
            v = v[..., slice(*t.rows), :]
        vals.append(v)
    return np.stack(vals) if len(vals) > 1 else vals[0]


def _sanitized(name: str, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    config = _config(name)
    model_cls, args_cls = fl.model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    out = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    return {k: np.array(v) for k, v in out.items()}


def _check_against_sanitize(name: str, groups: list[SourceGroup], dense: dict[str, np.ndarray], published: dict[str, np.ndarray]) -> None:
    config = _config(name)
    targets, dropped = LAYOUTS[name]().targets(groups, config)
    expected = _sanitized(name, published)
    names = [t.name for t in targets]
    assert len(names) == len(set(names)), "two targets share a name"
    assert set(names) == set(expected), f"only ours: {sorted(set(names) - set(expected))[:5]}, only sanitize: {sorted(set(expected) - set(names))[:5]}"
    for t in targets:
        ours = _apply(t, dense)
        assert ours.shape == expected[t.name].shape, t.name
        np.testing.assert_array_equal(ours, expected[t.name], err_msg=t.name)
    used = {s.name for t in targets for s in t.sources}
    assert set(dropped) == {g.name for g in groups} - used
    prefix = DROPPED_PREFIX.get(name)
    assert set(dropped) == ({g.name for g in groups if g.name.startswith(prefix)} if prefix else set())


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_is_registered(name):
    assert type(layout_for(_config(name))) is LAYOUTS[name]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_targets_match_sanitize_on_published_checkpoint(name):
    """Groups found in the published fixture; dense values decoded independently (fixture_lib)."""
    d = FIXTURES / name
    with Checkpoint(d) as ck:
        groups = find_groups(ck.tensors, _config(name))
    dense = fo.decode_dense(d)
    assert {g.name for g in groups} == set(dense)
    _check_against_sanitize(name, groups, dense, fo.published_dense(d))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_targets_match_sanitize_on_dense_release_naming(name):
    """The same weights as a BF16 release names them (step3p5: experts stacked [E, out, in])."""
    published = fo.published_dense(FIXTURES / name)
    groups = [SourceGroup(k, "dense", {"weight": k}, tuple(v.shape)) for k, v in published.items()]
    _check_against_sanitize(name, groups, published, published)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_quantizable_is_exactly_the_modules_with_to_quantized(name):
    config = _config(name)
    model_cls, args_cls = fl.model_classes(config)
    model = model_cls(args_cls.from_dict(config))
    runtime = {path for path, m in model.named_modules() if hasattr(m, "to_quantized")}
    with Checkpoint(FIXTURES / name) as ck:
        groups = find_groups(ck.tensors, config)
    targets, _ = LAYOUTS[name]().targets(groups, config)
    ours = {t.module for t in targets if t.quantizable}
    assert ours == runtime, f"only ours: {sorted(ours - runtime)}, only runtime: {sorted(runtime - ours)}"


def test_gpt_oss_deinterleave_matches_mlx_lm_on_the_mxfp4_tensors():
    """sanitize() on the stored blocks/scales (its MXFP4 path), dequantized by MLX, equals our row split
    of the independently decoded tensor: nibble order, block layout and gate/up interleave agree."""
    d = FIXTURES / "gpt-oss-tiny"
    raw, _ = fl.read_checkpoint(d)
    sanitized = _sanitized("gpt-oss-tiny", {k: v if v.dtype == np.uint8 else v.astype(np.float32) for k, v in raw.items()})
    with Checkpoint(d) as ck:
        groups = find_groups(ck.tensors, _config("gpt-oss-tiny"))
    targets, _ = GptOssLayout().targets(groups, _config("gpt-oss-tiny"))
    dense = fo.decode_dense(d)
    assert {t.name for t in targets} == {k for k in sanitized if not k.endswith(".scales")}
    experts = [t for t in targets if ".experts." in t.name and t.name.endswith(".weight")]
    assert len(experts) == 6
    for t in experts:
        module = t.module
        mlx = mx.dequantize(mx.array(sanitized[t.name]), mx.array(sanitized[f"{module}.scales"]), group_size=32, bits=4, mode="mxfp4")
        np.testing.assert_array_equal(np.array(mlx.astype(mx.float32)), _apply(t, dense), err_msg=t.name)


def test_missing_expert_is_refused():
    g = [SourceGroup(f"model.layers.0.mlp.experts.{e}.up_proj.weight", "dense", {}, (8, 8)) for e in (0, 1, 3)]
    with pytest.raises(FmtconvError, match="missing \\[2\\]"):
        Qwen3MoeLayout().targets(g, {"num_experts": 4})
    with pytest.raises(FmtconvError, match="expected 0..3"):
        stacked_experts({("p", "up_proj"): {0: g[0]}}, 4, lambda p, q: "x")


def test_step3p5_norms_are_shifted_only_in_stepfun_naming():
    """sanitize adds 1 to norm weights only for checkpoints still in StepFun's names."""
    norm = SourceGroup("model.layers.0.input_layernorm.weight", "dense", {}, (4,))
    cfg = {"num_hidden_layers": 1}
    published = [norm, SourceGroup("model.layers.0.moe.gate.weight", "dense", {}, (2, 4))]
    converted = [norm, SourceGroup("model.layers.0.mlp.gate.gate.weight", "dense", {}, (2, 4))]
    t_pub = {t.name: t for t in Step3p5Layout().targets(published, cfg)[0]}
    t_conv = {t.name: t for t in Step3p5Layout().targets(converted, cfg)[0]}
    assert t_pub[norm.name].transform is not None and t_conv[norm.name].transform is None
    v = np.array([0.5, -0.25, 0.0, 1.0], dtype=fl.ml_dtypes.bfloat16)
    out = t_pub[norm.name].transform(v)
    assert out.dtype == v.dtype and out.astype(np.float32).tolist() == [1.5, 0.75, 1.0, 2.0]
