"""End to end with both affine encoders: every fixture -> q4q8 with minmax and with mse -> mlx_lm.load -> logits.

The mse bundle must load in the runtime, pass the same logits gate as the minmax bundle (the gates of
test_e2e_deepseek.py and test_e2e_others.py), and come closer to the float32 reference built from the
fixture's independent dense decode: lower relative RMS logits error than minmax at the same bits.
`pytest -s` prints the figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from fmtconv.convert import convert
except ImportError:  # the converter is not there yet
    pytest.skip("fmtconv.convert.convert is not importable", allow_module_level=True)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))
import family_others as fo  # noqa: E402
import fixture_lib as fl  # noqa: E402

DEEPSEEK = ("deepseek-v4-tiny", "deepseek-v3-fp8-tiny")
OTHERS = ("gpt-oss-tiny", "step3p5-mxfp4-tiny", "glm4-moe-lite-fp8-tiny", "qwen3-moe-fp8-tiny")
# test_e2e_deepseek.py's tokens and gate (rel RMS, top-1) and test_e2e_others.py's (max |diff|, top-1).
DEEPSEEK_TOKENS = [1, 5, 9, 33, 200, 17, 42, 7, 100, 3, 250, 11, 64, 128, 77, 19]


def _logits(name: str, bundle: Path) -> np.ndarray:
    import mlx.core as mx
    import mlx_lm

    model, _ = mlx_lm.load(str(bundle))
    if name in DEEPSEEK:
        return fl.reference_logits(model, DEEPSEEK_TOKENS)
    model.set_dtype(mx.float32)  # CPU gather_mm is float32-only; bf16 scales/biases widen exactly
    return fl.reference_logits(model, fo.TOKEN_IDS)


def _reference(name: str) -> np.ndarray:
    if name in DEEPSEEK:
        return fl.reference_logits(fl.reference_model(FIXTURES / name), DEEPSEEK_TOKENS)
    return fl.reference_logits(fo.reference_model(FIXTURES / name), fo.TOKEN_IDS)


def _gate(name: str, got: np.ndarray, ref: np.ndarray) -> tuple[bool, str]:
    rel = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    diff = float(np.abs(got - ref).max())
    ok = (rel < 0.5 and top1 >= 0.4) if name in DEEPSEEK else (diff < 2.5 and top1 >= 0.5)
    return ok, f"rel RMS {rel:.4f}, max |diff| {diff:.3f}, top-1 {top1:.3f}"


def _rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))


@pytest.fixture(scope="module", params=DEEPSEEK + OTHERS)
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
    ref = _reference(name)
    got = {enc: _logits(name, out[enc]) for enc in out}
    lines = []
    for enc, logits in got.items():
        assert np.isfinite(logits).all(), enc
        ok, msg = _gate(name, logits, ref)
        lines.append(f"{enc}: {msg}")
        assert ok, f"{name} {enc}: {msg}"
    rel = {enc: _rel_rms(g, ref) for enc, g in got.items()}
    print(f"{name} q4q8 logits vs float32 reference: " + "; ".join(lines) +
          f"; mse/minmax rel RMS {rel['mse'] / rel['minmax']:.3f}")
    assert rel["mse"] < rel["minmax"], rel
