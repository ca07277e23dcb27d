"""End to end with both affine encoders: every fixture -> q4q8 with minmax and with mse -> its runtime's load -> logits.

The mse bundle must load in the runtime that owns the fixture's model_type, pass the same logits gate as the
minmax bundle (test_runtime_clients.py's: within 1.25x the error of MLX's own quantization of the exactly
decoded weights at the same settings), and come closer to the float32 reference of those decoded weights:
lower relative RMS logits error than minmax at the same bits.  `pytest -s` prints the figures.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

from fmtconv.convert import convert
from runtime_helpers import CLIENTS, FIXTURES, baseline_model, load_bundle, logits, module_settings, rel_rms, tokens_for


@functools.cache
def _reference(name: str) -> np.ndarray:
    fixture = FIXTURES / name
    return logits(CLIENTS[name][1](fixture), tokens_for(fixture))


@pytest.fixture(scope="module", params=list(CLIENTS))
def both(request, tmp_path_factory):
    name = request.param
    out = {}
    for enc in ("minmax", "mse"):
        dst = tmp_path_factory.mktemp(f"{name}-{enc}") / "bundle"
        convert(FIXTURES / name, dst, recipe="q4q8", kernel_backend="cpu", overwrite=True, quiet=True, encoder=enc)
        out[enc] = dst
    return name, out


def test_mse_bundle_is_plain_mlx_affine_of_the_same_size(both):
    name, out = both
    a, b = (json.loads((out[e] / "config.json").read_text()) for e in ("minmax", "mse"))
    assert a["quantization"] == b["quantization"]
    assert (a["fmtconv"]["encoder"], b["fmtconv"]["encoder"]) == ("minmax", "mse")
    assert set(b["fmtconv"]["encoders"].values()) == {"mse"}
    ia, ib = (json.loads((out[e] / "model.safetensors.index.json").read_text()) for e in ("minmax", "mse"))
    assert ia["metadata"]["total_size"] == ib["metadata"]["total_size"]
    assert ia["weight_map"].keys() == ib["weight_map"].keys()
    assert "Affine encoder | mse" in (out["mse"] / "README.md").read_text()


def test_mse_passes_the_logits_gate_and_beats_minmax(both):
    name, out = both
    fixture = FIXTURES / name
    runtime = CLIENTS[name][0]
    tokens = tokens_for(fixture)
    ref = _reference(name)
    models = {enc: load_bundle(out[enc], runtime) for enc in out}
    settings = module_settings(models["mse"])
    assert settings == module_settings(models["minmax"])
    base = rel_rms(logits(baseline_model(fixture, settings), tokens), ref)
    err = {}
    top1 = {}
    for enc, model in models.items():
        got = logits(model, tokens)
        assert np.isfinite(got).all(), enc
        err[enc] = rel_rms(got, ref)
        top1[enc] = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"{name} q4q8 ({runtime}) logits rel RMS vs the decoded reference: minmax {err['minmax']:.4f} "
          f"(top-1 {top1['minmax']:.3f}), mse {err['mse']:.4f} (top-1 {top1['mse']:.3f}), MLX baseline {base:.4f}; "
          f"mse/minmax {err['mse'] / err['minmax']:.3f}")
    assert err["minmax"] <= 1.25 * base and err["mse"] <= 1.25 * base, (err, base)
    assert err["mse"] < err["minmax"], err
