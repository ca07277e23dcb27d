"""DeepSeek-V4.1 for mlx-lm: DeepSeek's published names -> the names mlx_lm's deepseek_v41 model uses after sanitize().

Mirrors mlx_lm 0.32.2 `mlx_lm/models/deepseek_v41.py` (`_rename`, `_DROP_PREFIXES`, `_EXPERT_KEY`,
`Model.sanitize`): `embed`/`head`/`attn`/`ffn` renamed, routed experts stacked into
`mlp.experts.switch_mlp.{gate,down,up}_proj` in expert order, `wo_a` split into its `o_groups`
blocks, `mtp.`/`vision.`/`aligner.`/`image_` and engram weights dropped. A checkpoint whose names
already start with `model.` is taken as converted and kept as it is, as sanitize() does.
"""

from __future__ import annotations

import functools
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, stacked_experts
from fmtconv.convert.releases.deepseek_v4 import EXPERT_KEY, EXPERT_PROJ, MTP_PREFIX, split_o_groups, without_fp4_experts
from fmtconv.formats.base import SourceGroup

# deepseek_v41 Model.sanitize drops these (mlx_lm 0.32.2 `_DROP_PREFIXES`).
_DROP_PREFIXES = ("vision.", "aligner.", "image_", MTP_PREFIX)

# Substring replacements, in deepseek_v41._rename's order.
_RENAMES = (
    (".attn.", ".self_attn."),
    (".ffn.", ".mlp."),
    (".attn_norm.", ".input_layernorm."),
    (".ffn_norm.", ".post_attention_layernorm."),
    (".hc_attn_", ".attn_hc."),
    (".hc_ffn_", ".ffn_hc."),
    (".attn_sink", ".sinks"),
    (".wq_a.", ".q_a_proj."),
    (".wq_b.", ".q_b_proj."),
    (".wkv.", ".kv_proj."),
    (".wgate.", ".gate_proj."),
    (".wo_a.", ".o_a_proj."),
    (".wo_b.", ".o_b_proj."),
    (".q_norm.", ".q_a_norm."),
    (".compressor.norm.", ".compressor.kv_norm."),
    (".indexer.wk.", ".indexer.k_proj."),
    (".gate.bias", ".gate.e_score_correction_bias"),
    (".shared_experts.w1.", ".shared_experts.gate_proj."),
    (".shared_experts.w2.", ".shared_experts.down_proj."),
    (".shared_experts.w3.", ".shared_experts.up_proj."),
)

# Modules of deepseek_v41 that have `to_quantized` (nn.Linear, nn.Embedding, SwitchLinear), by leaf name.
# Not: the router `mlp.gate` (a plain Module), norms, hyper-connections, sinks.
_QUANTIZABLE_LEAVES = frozenset(
    {
        "q_a_proj",
        "q_b_proj",
        "kv_proj",
        "o_a_proj",
        "o_b_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "weights_proj",
        "k_proj",
        "embed_tokens",
        "lm_head",
    }
)


def mlx_name(key: str) -> str:
    """One published DeepSeek-V4 name -> its mlx_lm name (deepseek_v41._rename)."""
    if key == "head.weight":
        return "lm_head.weight"
    if key == "embed.weight":
        return "model.embed_tokens.weight"
    key = f"model.{key}"
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def is_quantizable(name: str) -> bool:
    """Whether the runtime module holding this (post-sanitize) weight has `to_quantized`."""
    if not name.endswith(".weight"):
        return False
    module = name[: -len(".weight")]
    return module.rsplit(".", 1)[-1] in _QUANTIZABLE_LEAVES


def _dropped(name: str) -> bool:
    return name.startswith(_DROP_PREFIXES) or ".engram." in name or name.endswith(".gate.bias_vl")


class DeepseekV41Layout(ModelLayout):
    """DeepSeek-V4.1-style published checkpoints for mlx_lm's deepseek_v41 model."""

    family = "deepseek_v41"
    model_types = ("deepseek_v41", "deepseek_v41_text")
    runtime = "mlx-lm"
    mlx_vlm_wraps = False  # mlx-vlm 0.7.10's deepseek_v41 is its own port (language_model.layers.N..., no model.)
    # deepseek_v41 Model.cast_predicate: the reference runtime keeps these in float32.
    uncast = ("attn_hc.", "ffn_hc.", "sinks", "e_score_correction_bias", "compressor.")

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        if any(g.name.startswith("model.") for g in groups):
            # sanitize() returns such a checkpoint untouched: names are already the runtime's.
            return [TargetTensor(g.name, (g,), quantizable=is_quantizable(g.name)) for g in groups], []
        text = config.get("text_config") or config
        o_groups = int(text.get("o_groups", 1))
        n_experts = text.get("n_routed_experts")
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            if _dropped(g.name):
                dropped.append(g.name)
                continue
            m = EXPERT_KEY.fullmatch(g.name)
            if m:
                experts.setdefault((f"layers.{m[1]}.ffn", m[3]), {})[int(m[2])] = g
                continue
            name = mlx_name(g.name)
            transform = None
            if name.endswith(".o_a_proj.weight"):
                transform = functools.partial(split_o_groups, groups=o_groups)
            out.append(TargetTensor(name, (g,), transform=transform, quantizable=is_quantizable(name)))
        out += stacked_experts(
            experts, n_experts,
            lambda prefix, proj: f"model.{prefix.replace('.ffn', '.mlp')}.experts.switch_mlp.{EXPERT_PROJ[proj]}.weight",
        )
        return out, dropped

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return without_fp4_experts(config)
