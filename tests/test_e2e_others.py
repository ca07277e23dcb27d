"""End to end for gpt-oss, step3p5, glm4_moe_lite and qwen3_moe: convert the published-layout fixture
with the q4q8 recipe, load the bundle with mlx_lm.load, and check (a) the quantization of every
module against the recipe's intent, (b) logits against a float32 reference model built from an
independent dense decode of the fixture (fixtures/family_others.py, fixture_lib).
"""

from __future__ import annotations

import re
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

# q4q8: routed experts (SwitchLinear) 4-bit affine group 64; every other quantizable module 8-bit
# affine group 64. Per fixture: module-path pattern -> (bits, number of such modules). Every
# dimension of these tiny models is a multiple of 64, so nothing falls back to "keep".
EXPECTED: dict[str, dict[str, tuple[int, int]]] = {
    "gpt-oss-tiny": {
        r"model\.layers\.\d+\.mlp\.experts\.(gate|up|down)_proj": (4, 6),
        r"model\.layers\.\d+\.self_attn\.[qkvo]_proj": (8, 8),
        r"model\.layers\.\d+\.mlp\.router": (8, 2),
        r"model\.embed_tokens|lm_head": (8, 2),
    },
    "step3p5-mxfp4-tiny": {
        r"model\.layers\.\d+\.mlp\.switch_mlp\.(gate|up|down)_proj": (4, 6),
        r"model\.layers\.\d+\.self_attn\.[qkvog]_proj": (8, 15),
        r"model\.layers\.0\.mlp\.(gate|up|down)_proj": (8, 3),
        r"model\.layers\.\d+\.mlp\.share_expert\.(gate|up|down)_proj": (8, 6),
        r"model\.layers\.\d+\.mlp\.gate\.gate": (8, 2),
        r"model\.embed_tokens|lm_head": (8, 2),
    },
    "glm4-moe-lite-fp8-tiny": {
        r"model\.layers\.1\.mlp\.switch_mlp\.(gate|up|down)_proj": (4, 3),
        r"model\.layers\.\d+\.self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|embed_q|unembed_out|o_proj)": (8, 12),
        r"model\.layers\.0\.mlp\.(gate|up|down)_proj": (8, 3),
        r"model\.layers\.1\.mlp\.shared_experts\.(gate|up|down)_proj": (8, 3),
        r"model\.embed_tokens|lm_head": (8, 2),
    },
    "qwen3-moe-fp8-tiny": {
        r"model\.layers\.\d+\.mlp\.switch_mlp\.(gate|up|down)_proj": (4, 6),
        r"model\.layers\.\d+\.self_attn\.[qkvo]_proj": (8, 8),
        r"model\.layers\.\d+\.mlp\.gate": (8, 2),
        r"model\.embed_tokens|lm_head": (8, 2),
    },
}
# Logits vs the float32 reference (std ~1 on these fixtures). Tiny random models amplify weight
# noise: MLX itself, quantizing the same bf16 weights with the same bits, moves them by up to ~1.6
# and flips up to ~40% of the near-tied top-1 tokens, so these bounds are loose; the tight check is
# against that MLX-quantized reference (same bits, MLX's own quantize), which must agree exactly.
MAX_ABS_DIFF = 2.5
MIN_TOP1 = 0.5
MLX_MAX_ABS_DIFF = 1e-4


def intended(name: str, path: str) -> int | None:
    """The recipe's intended bits for a module path (None: not quantized)."""
    hits = [bits for p, (bits, _) in EXPECTED[name].items() if re.fullmatch(p, path)]
    return hits[0] if hits else None


@pytest.fixture(scope="module", params=list(EXPECTED))
def converted(request, tmp_path_factory):
    name = request.param
    out = tmp_path_factory.mktemp(name) / "bundle"
    convert(FIXTURES / name, out, recipe="q4q8", kernel_backend="cpu", overwrite=True, quiet=True)
    import mlx_lm

    model, _ = mlx_lm.load(str(out))
    return name, model


def test_quantization_matches_recipe(converted):
    name, model = converted
    quantized = {path: (m.bits, m.group_size, m.mode) for path, m in model.named_modules() if hasattr(m, "bits") and hasattr(m, "group_size")}
    counts = dict.fromkeys(EXPECTED[name], 0)
    for path, (bits, group, mode) in sorted(quantized.items()):
        hits = [p for p in EXPECTED[name] if re.fullmatch(p, path)]
        assert len(hits) == 1, f"{path}: quantized ({bits}-bit) but expected by {hits or 'no rule'}"
        want = (EXPECTED[name][hits[0]][0], 64, "affine")
        assert (bits, group, mode) == want, f"{path}: loaded as {(bits, group, mode)}, q4q8 intends {want}"
        counts[hits[0]] += 1
    assert counts == {p: n for p, (_, n) in EXPECTED[name].items()}
    # Nothing quantizable was left unquantized.
    assert not [p for p, m in model.named_modules() if hasattr(m, "to_quantized") and not hasattr(m, "bits")]


def mlx_quantized_reference(name: str):
    """The float32 reference, cast to bf16 (the bundle's compute dtype) and quantized by MLX's own
    nn.quantize with the recipe's intended bits (group 64, affine), evaluated in float32."""
    import mlx.core as mx
    import mlx.nn as nn

    model = fo.reference_model(FIXTURES / name)
    model.set_dtype(mx.bfloat16)

    def predicate(path, module):
        bits = intended(name, path) if hasattr(module, "to_quantized") else None
        return False if bits is None else {"bits": bits, "group_size": 64, "mode": "affine"}

    nn.quantize(model, class_predicate=predicate)
    model.set_dtype(mx.float32)
    return model


def test_logits_close_to_reference(converted):
    import mlx.core as mx

    name, model = converted
    model.set_dtype(mx.float32)  # CPU gather_mm is float32-only; bf16 scales/biases widen exactly
    got = fl.reference_logits(model, fo.TOKEN_IDS)
    ref = fl.reference_logits(fo.reference_model(FIXTURES / name), fo.TOKEN_IDS)
    mlx_q = fl.reference_logits(mlx_quantized_reference(name), fo.TOKEN_IDS)
    diff = float(np.abs(got - ref).max())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    diff_q = float(np.abs(got - mlx_q).max())
    top1_q = float((got.argmax(-1) == mlx_q.argmax(-1)).mean())
    print(
        f"{name}: vs float32 reference max |diff| {diff:.4f}, top-1 {top1:.3f}; "
        f"vs MLX-quantized reference max |diff| {diff_q:.2e}, top-1 {top1_q:.3f} ({len(fo.TOKEN_IDS)} tokens)"
    )
    assert np.isfinite(got).all()
    assert diff_q < MLX_MAX_ABS_DIFF and top1_q == 1.0, (diff_q, top1_q)
    assert diff < MAX_ABS_DIFF, diff
    assert top1 >= MIN_TOP1, top1
