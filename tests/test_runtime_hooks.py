"""The runtimes' hooks the evaluation builds on: logits at every position through the model's text path, and the
stored name -> runtime parameter path of each layout (vMLX's, against jang's own model: tests/test_vmlx_client.py)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np

from fmtconv.convert import plan
from fmtconv.convert.layouts import bundle_layout
from fmtconv.convert.runtimes import RUNTIMES
from runtime_helpers import CLIENTS, FIXTURES, tokens_for


def _ids(name: str, n: int = 12) -> mx.array:
    return mx.array(np.asarray(tokens_for(FIXTURES / name)[:n], np.int32))[None]


def test_mlx_lm_sequence_logits_are_the_models_own():
    name = "qwen3-moe-fp8-tiny"
    model = CLIENTS[name][1](FIXTURES / name)
    ids = _ids(name)
    got = RUNTIMES["mlx-lm"].sequence_logits(model, ids)
    vocab = json.loads((FIXTURES / name / "config.json").read_text())["vocab_size"]
    assert got.shape == (1, 12, vocab) and mx.array_equal(got, model(ids)).item()


def test_mlx_vlm_sequence_logits_run_the_language_model():
    name = "deepseek-v4-flash-tiny"
    model = CLIENTS[name][1](FIXTURES / name)
    ids = _ids(name)
    got = RUNTIMES["mlx-vlm"].sequence_logits(model, ids)
    assert got.shape == (1, 12, 256) and mx.array_equal(got, model.language_model(ids).logits).item()


def test_post_sanitize_layouts_name_the_runtime_parameters_as_stored():
    for name, (runtime, _) in CLIENTS.items():
        p = plan(FIXTURES / name, "q4q8")
        assert p.runtime == runtime
        assert all(p.layout.runtime_name(s.name) == s.name for t in p.tensors for s in t.parts)
        assert all(t.runtime_module == t.target.module for t in p.tensors)


def test_a_bundle_config_names_its_layout():
    v4 = json.loads((FIXTURES / "deepseek-v4-flash-tiny" / "config.json").read_text())
    assert bundle_layout(v4).runtime == "mlx-vlm"
    assert bundle_layout({**v4, "fmtconv": {"layout": "deepseek_v4", "runtime": "vmlx"}}).runtime_name("head.scales") == "lm_head.scales"
    assert bundle_layout({"model_type": "qwen3_moe", "fmtconv": {"layout": "qwen3_moe", "runtime": "vmlx"}}).family == "generic"
