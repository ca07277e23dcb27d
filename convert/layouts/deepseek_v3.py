"""DeepSeek-V3 / Kimi-K2 layout: HF names -> the names mlx_lm's deepseek_v3 model uses after sanitize().

Mirrors mlx_lm 0.32.2 `mlx_lm/models/deepseek_v3.py` `Model.sanitize` (and `utils.MODEL_REMAPPING`,
which sends kimi_k2 and joyai_llm_flash to the same module): routed experts
`mlp.experts.E.{gate,up,down}_proj` stacked into `mlp.switch_mlp.*` in expert order; each
`self_attn.kv_b_proj` split into `embed_q` (the key half, transposed per head) and `unembed_out`
(the value half); the multi-token-prediction layer and `rotary_emb.inv_freq` dropped.

mlx_lm drops the MTP layer by the literal prefix `model.layers.61` (DeepSeek-V3's size); here every
layer index >= num_hidden_layers is dropped, which is the same on V3 and right on smaller models.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, stacked_experts
from fmtconv.formats.base import SourceGroup

_EXPERT_KEY = re.compile(r"(model\.layers\.\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_KV_B = re.compile(r"(model\.layers\.\d+\.self_attn)\.kv_b_proj\.weight")

# Modules of deepseek_v3 that have `to_quantized` (nn.Linear, nn.Embedding, MultiLinear, SwitchLinear).
# Not: the router `mlp.gate` (MoEGate), norms, `e_score_correction_bias`.
_QUANTIZABLE_LEAVES = frozenset(
    {
        "q_proj",
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "embed_q",
        "unembed_out",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "embed_tokens",
        "lm_head",
    }
)


def is_quantizable(name: str) -> bool:
    """Whether the runtime module holding this (post-sanitize) weight has `to_quantized`."""
    if not name.endswith(".weight"):
        return False
    return name[: -len(".weight")].rsplit(".", 1)[-1] in _QUANTIZABLE_LEAVES


def embed_q(values: np.ndarray, heads: int, nope: int) -> np.ndarray:
    """kv_b_proj [heads * (nope + v), kv_lora] -> embed_q [heads, kv_lora, nope] (deepseek_v3.sanitize)."""
    v = values.reshape(heads, -1, values.shape[-1])
    return np.ascontiguousarray(v[:, :nope, :].swapaxes(-1, -2))


def unembed_out(values: np.ndarray, heads: int, nope: int) -> np.ndarray:
    """kv_b_proj [heads * (nope + v), kv_lora] -> unembed_out [heads, v, kv_lora] (deepseek_v3.sanitize)."""
    v = values.reshape(heads, -1, values.shape[-1])
    return np.ascontiguousarray(v[:, nope:, :])


class DeepseekV3Layout(ModelLayout):
    """DeepSeek-V3 / R1 / V3.1 and Kimi-K2 style checkpoints for mlx_lm's deepseek_v3 model."""

    family = "deepseek_v3"
    model_types = ("deepseek_v3", "kimi_k2", "joyai_llm_flash")
    uncast = ("e_score_correction_bias",)  # deepseek_v3 Model.cast_predicate

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        n_layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        nope = int(config["qk_nope_head_dim"])
        n_experts = config.get("n_routed_experts")
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            layer = _LAYER.match(g.name)
            if (layer and int(layer[1]) >= n_layers) or "rotary_emb.inv_freq" in g.name:
                dropped.append(g.name)
                continue
            m = _EXPERT_KEY.fullmatch(g.name)
            if m:
                experts.setdefault((f"{m[1]}.mlp", m[3]), {})[int(m[2])] = g
                continue
            kv = _KV_B.fullmatch(g.name)
            if kv:
                for name, fn in ((f"{kv[1]}.embed_q.weight", embed_q), (f"{kv[1]}.unembed_out.weight", unembed_out)):
                    transform = functools.partial(fn, heads=heads, nope=nope)
                    out.append(TargetTensor(name, (g,), transform=transform, quantizable=True))
                continue
            out.append(TargetTensor(g.name, (g,), quantizable=is_quantizable(g.name)))
        out += stacked_experts(experts, n_experts, lambda prefix, proj: f"{prefix}.switch_mlp.{proj}.weight")
        return out, dropped
