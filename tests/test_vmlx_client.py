"""vMLX, the real client: fmtconv's DeepSeek-V4 bundles for `--runtime vmlx` loaded by vMLX's own loader
(`vmlx_engine.utils.tokenizer.load_model_with_fallback`) leave the bundle byte for byte as written, give every module
the bits, group and mode the recipe gave it, and logits within 1.25x the error of jang's model quantized by MLX at
the same settings; the conformance check, the layout's runtime names and the eval hooks against jang's model class.

Runs in .ci/run's vMLX environment (vmlx 1.6.81, jang 2.5.50, mlx-lm 0.31.3: .ci/constraints-vmlx.txt); skipped where
vMLX is not installed.  Importing vmlx_engine rewrites files of that environment's mlx-lm: keep it in its own.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vmlx
if os.environ.get("FMTCONV_REQUIRE_VMLX"):  # .ci/run's vMLX environment: a missing vMLX fails, never skips
    import jang_tools.dsv4.mlx_register  # noqa: F401
    import vmlx_engine  # noqa: F401
else:
    pytest.importorskip("jang_tools.dsv4.mlx_register", reason="vMLX's model (jang) is not installed")
    pytest.importorskip("vmlx_engine", reason="vMLX is not installed")

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import release_headers as rh  # noqa: E402
from fmtconv.convert import convert, plan  # noqa: E402
from fmtconv.convert.check.conformance import check_bundle, check_plan  # noqa: E402
from fmtconv.convert.runtimes import RUNTIMES  # noqa: E402
from runtime_helpers import FIXTURES, module_settings, rel_rms, tokens_for  # noqa: E402

import fixture_lib as fl  # noqa: E402  (runtime_helpers puts fixtures/ on the path)

V4 = FIXTURES / "deepseek-v4-flash-tiny"
VMLX = RUNTIMES["vmlx"]
CASES = [pytest.param(r, e, id=f"{r}-{e}") for r in ("q4q8", "mixed_3_6") for e in ("minmax", "mse")]


def files(bundle: Path) -> dict[str, str]:
    """Every file under the bundle, hidden ones included (vMLX's lock and journal would be), with its SHA-256."""
    return {p.relative_to(bundle).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(bundle.rglob("*")) if p.is_file()}


@pytest.fixture
def vmlx_load(tmp_path, monkeypatch):
    """vMLX's loader, with its integrity stamps in a temp folder (never the user's cache, never a fixture)."""
    monkeypatch.setenv("VMLX_MODEL_INTEGRITY_CACHE_DIR", str(tmp_path / "vmlx-integrity"))
    from vmlx_engine.utils.tokenizer import load_model_with_fallback

    return lambda path: load_model_with_fallback(str(path))[0]


def full_logits(model, ids: list[int]) -> np.ndarray:
    """float32 logits [L, vocab] at every position, the model widened to float32 first (scales and biases exactly)."""
    model.set_dtype(mx.float32)
    return np.array(VMLX.sequence_logits(model, mx.array(np.asarray(ids, np.int32))[None])[0])


@functools.cache
def reference_logits() -> np.ndarray:
    """jang's model holding the fixture decoded by the fixture generator's own decoder, in float32."""
    return full_logits(fl.reference_model(V4), tokens_for(V4))


def baseline_model(loaded) -> nn.Module:
    """jang's model with the decoded fixture, each float in the dtype the loaded bundle holds it in (a quantized module's
    weight in its scales' dtype), quantized by MLX's nn.quantize at the loaded bundle's per-module settings."""
    held = {k: v.dtype for k, v in tree_flatten(loaded.parameters())}
    settings = module_settings(loaded)
    model = fl.reference_model(V4)

    def dtype(k: str):
        module = k.rsplit(".", 1)[0]
        return held.get(f"{module}.scales", held.get(k)) if module in settings else held.get(k)

    model.load_weights([(k, v.astype(dtype(k)) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in tree_flatten(model.parameters())])
    nn.quantize(model, class_predicate=lambda p, m: settings.get(p, False) if hasattr(m, "to_quantized") else False)
    return model


@pytest.mark.parametrize("recipe,encoder", CASES)
def test_vmlx_loads_the_bundle_unchanged_with_the_recipe_bits_and_logits_gate(recipe, encoder, tmp_path, vmlx_load):
    out = tmp_path / "bundle"
    p = plan(V4, recipe, runtime="vmlx", encoder=encoder)
    summary = convert(V4, out, recipe=recipe, runtime="vmlx", encoder=encoder, kernel_backend="cpu")
    assert [(c["runtime"], c["ok"]) for c in summary["conformance"]] == [("vmlx", True)] * 2  # before writing, before the rename
    written = files(out)
    assert not any(n.startswith(".") or n == "jang_config.json" for n in written)

    model = vmlx_load(out)
    assert files(out) == written  # no file rewritten, none added (no alignment repair, no lock, no jang_config.json)
    assert type(model).__module__ == "jang_tools.dsv4.mlx_model"
    settings = module_settings(model)
    intent = {t.runtime_module: {"bits": t.bits, "group_size": t.group_size, "mode": t.mode} for t in p.tensors if t.quantized}
    assert settings == intent  # every module the recipe quantized, at its bits, group and mode, and nothing else
    if recipe == "mixed_3_6":
        assert settings["model.layers.2.mlp.switch_mlp.down_proj"]["bits"] == settings["lm_head"]["bits"] == 6
        assert settings["model.layers.1.mlp.switch_mlp.down_proj"]["bits"] == 3

    base = baseline_model(model)
    tokens = tokens_for(V4)
    ref = reference_logits()
    err, base_err = rel_rms(full_logits(model, tokens), ref), rel_rms(full_logits(base, tokens), ref)
    print(f"vmlx {recipe} {encoder}: logits rel RMS {err:.4f}, baseline {base_err:.4f}, ratio {err / base_err:.3f}")
    assert err <= 1.25 * base_err, (err, base_err)


def test_conformance_refuses_an_mlx_vlm_bundle_and_passes_at_full_size(tmp_path):
    """The issue's failure, caught before anything is written: mlx-vlm's names are not jang's. And the full-size
    DeepSeek-V4-Flash release (header-only) plans and checks against jang's model class."""
    convert(V4, tmp_path / "vlm", recipe="q4q8", kernel_backend="cpu")
    report = check_bundle(tmp_path / "vlm", "vmlx")
    assert report.problems and any("language_model.lm_head" in p for p in report.problems)
    src = rh.write_release(tmp_path / "release", rh.v4_flash_config(), rh.v4_flash_specs())
    p = plan(src, "q4q8", runtime="vmlx")
    report = check_plan(p)
    assert report.ok, report.problems[:5]
    experts = {t.runtime_module: t.bits for t in p.tensors if t.quantized and ".mlp.switch_mlp." in t.runtime_module}
    assert len(experts) == 43 * 3 and set(experts.values()) == {4}
    print(f"DeepSeek-V4-Flash q4q8 for vmlx: check {report.seconds:.1f} s, {report.tensors} tensors, {report.quantized_modules} modules")


def test_runtime_name_is_what_jangs_sanitize_makes_of_every_tensor(tmp_path):
    convert(V4, tmp_path / "out", recipe="q4q8", runtime="vmlx", kernel_backend="cpu")
    run = subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", "verify", str(tmp_path / "out"), "--runtime"],
                         capture_output=True, text=True)
    assert run.returncode == 0 and "runtime check: jang_tools.dsv4.mlx_model (vmlx) loads all 178 tensors" in run.stdout
    stored = {k: v for s in sorted((tmp_path / "out").glob("model-*.safetensors")) for k, v in mx.load(str(s)).items()}
    layout = plan(V4, "q4q8", runtime="vmlx").layout
    model = fl.reference_model(V4)  # jang's class (mlx_register is imported)
    sanitized = model.sanitize(dict(stored))
    assert {layout.runtime_name(k): tuple(v.shape) for k, v in stored.items()} == {k: tuple(v.shape) for k, v in sanitized.items()}
    for k, v in stored.items():
        assert sanitized[layout.runtime_name(k)] is v  # the same array: sanitize renamed it, nothing else


def test_sequence_logits_runs_each_decoder_layer_object_in_order():
    model = fl.reference_model(V4)
    ids = mx.array(np.asarray(tokens_for(V4)[:20], np.int32))[None]
    last = np.array(model(ids)[0, -1])  # jang's Model.__call__: only the last position when L > 1
    seen: list[int] = []

    class Wrapped(nn.Module):
        def __init__(self, layer, i):
            super().__init__()
            self.layer, self.i = layer, i

        def __call__(self, *args, **kwargs):
            seen.append(self.i)
            return self.layer(*args, **kwargs)

    layers = model.model.layers
    for i, layer in enumerate(list(layers)):
        layers[i] = Wrapped(layer, i)
    logits = np.array(VMLX.sequence_logits(model, ids))
    assert logits.shape == (1, 20, json.loads((V4 / "config.json").read_text())["vocab_size"])
    assert seen == list(range(len(layers)))
    assert np.array_equal(logits[0, -1], last)
    assert np.array_equal(np.array(VMLX.sequence_logits(model, ids[:, :7]))[0, -1], np.array(model(ids[:, :7])[0, -1]))


def test_eval_runs_jangs_model_streamed_as_held_whole(tmp_path):
    """`fmtconv eval` on a vMLX bundle: the streamed pass (hooks on jang's decoder layer objects) agrees with both models
    held whole, and its teacher is the reference forward above."""
    from fmtconv.convert.check.eval import TokenBatch, evaluate, evaluate_direct

    convert(V4, tmp_path / "out", recipe="q4q8", runtime="vmlx", kernel_backend="cpu")
    ids = tokens_for(V4)
    tokens = TokenBatch([ids], "tokens_for")
    streamed, direct = evaluate(tmp_path / "out", V4, tokens), evaluate_direct(tmp_path / "out", V4, tokens)
    assert streamed.runtime == "vmlx" and len(streamed.layers) == 3
    for key in ("kl_mean", "top1", "top5", "ppl_student"):
        assert streamed.metrics[key] == pytest.approx(direct.metrics[key], rel=1e-5, abs=1e-12), key
    np.testing.assert_allclose(streamed.teacher_logits[0, : len(ids)], reference_logits(), rtol=1e-5, atol=1e-5)
