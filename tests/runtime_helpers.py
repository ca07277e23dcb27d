"""The real clients: load a bundle in the runtime that owns its model_type, and the logits baseline.

The baseline is the runtime's own model holding the exactly decoded fixture weights (decoded by the
fixture generator's independent code, not fmtconv), cast as the runtime's converter casts them, then
quantized by `nn.quantize` at the per-module settings the loaded bundle has.  Logits are compared in
float32 (bfloat16 and float16 weights widen exactly), against the float32 model of the decoded weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

import family_deepseek as fd  # noqa: E402,F401  (the drafter reference, tests/test_mtp.py)
import family_others as fo  # noqa: E402
import family_step as fs  # noqa: E402
import fixture_lib as fl  # noqa: E402

# fixture -> (runtime that owns its model_type, reference model builder)
CLIENTS = {
    "deepseek-v4-tiny": ("mlx-lm", fl.reference_model),
    "deepseek-v4-flash-tiny": ("mlx-vlm", fl.reference_vlm_model),
    "deepseek-v3-fp8-tiny": ("mlx-lm", fl.reference_model),
    "gpt-oss-tiny": ("mlx-lm", fo.reference_model),
    "step3p5-mxfp4-tiny": ("mlx-lm", fo.reference_model),
    "step3p7-nvfp4-tiny": ("mlx-vlm", fs.reference_model),
    "glm4-moe-lite-fp8-tiny": ("mlx-lm", fo.reference_model),
    "qwen3-moe-fp8-tiny": ("mlx-lm", fo.reference_model),
}


def tokens_for(fixture: Path, n: int = 24) -> list[int]:
    """Token ids inside the vocabulary; DeepSeek-V4-Flash gets 160, enough for its 128:1 compressor to emit."""
    config = json.loads((fixture / "config.json").read_text())
    vocab = config.get("vocab_size") or config["text_config"]["vocab_size"]
    if config.get("model_type") == "deepseek_v4":
        n = 160
    return [int(t) for t in np.random.default_rng(7).integers(3, min(vocab, 120), n)]


def load_bundle(path: Path, runtime: str):
    """The runtime's own `load` (model and tokenizer / processor)."""
    if runtime == "mlx-vlm":
        import mlx_vlm

        model, _ = mlx_vlm.load(str(path))
    else:
        import mlx_lm

        model, _ = mlx_lm.load(str(path))
    return model


def logits(model, token_ids: list[int]) -> np.ndarray:
    """float32 logits [len(token_ids), vocab] of one sequence, the model widened to float32 first."""
    model.set_dtype(mx.float32)
    out = model(mx.array(np.asarray(token_ids, np.int32))[None])
    out = getattr(out, "logits", out)
    return np.array(out[0].astype(mx.float32))


def module_settings(model) -> dict[str, dict[str, object]]:
    """path -> {bits, group_size, mode} of every quantized module of a loaded model."""
    return {p: {"bits": m.bits, "group_size": m.group_size, "mode": m.mode}
            for p, m in model.named_modules() if hasattr(m, "bits") and "scales" in m}


def baseline_model(fixture: Path, settings: dict[str, dict[str, object]], dtype: str = "bfloat16"):
    """The runtime's model with the decoded weights, cast like the runtime's converter, quantized by MLX at `settings`."""
    _, reference = CLIENTS[fixture.name]
    model = reference(fixture)
    cast = getattr(model, "cast_predicate", None) or (lambda _k: True)
    target = getattr(mx, dtype)
    model.load_weights([(k, v.astype(target) if cast(k) and mx.issubdtype(v.dtype, mx.floating) else v)
                        for k, v in tree_flatten(model.parameters())])
    nn.quantize(model, class_predicate=lambda p, m: settings.get(p, False) if hasattr(m, "to_quantized") else False)
    return model


def rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))
