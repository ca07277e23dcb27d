"""Qwen3-MoE layout: HF names -> the names mlx_lm's qwen3_moe model uses after sanitize().

Mirrors mlx_lm 0.32.2 `mlx_lm/models/qwen3_moe.py` `Model.sanitize`: routed experts
`model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` stacked in expert order into
`model.layers.N.mlp.switch_mlp.*`; `lm_head.weight` dropped when `tie_word_embeddings`.
Everything else keeps its name. The router `mlp.gate` is an nn.Linear there, so it is quantizable.
"""

from __future__ import annotations

import re
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, stacked_experts
from fmtconv.formats.base import SourceGroup

# Per-expert routed weights as HF checkpoints store them (prefix = the module holding `experts`).
EXPERT_KEY = re.compile(r"(?P<prefix>.+)\.experts\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


def is_norm(name: str) -> bool:
    """Whether a parameter belongs to a norm module (`...input_layernorm.weight`, `...q_norm.weight`)."""
    return "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]


class Qwen3MoeLayout(ModelLayout):
    """Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B and their FP8 releases) for mlx_lm's qwen3_moe model."""

    family = "qwen3_moe"
    model_types = ("qwen3_moe",)

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        tied = bool(config.get("tie_word_embeddings", False))
        for g in groups:
            if tied and g.name == "lm_head.weight":
                dropped.append(g.name)
                continue
            m = EXPERT_KEY.fullmatch(g.name)
            if m:
                experts.setdefault((m["prefix"], m["proj"]), {})[int(m["index"])] = g
                continue
            quantizable = g.name.endswith(".weight") and len(g.shape) >= 2 and not is_norm(g.name)
            out.append(TargetTensor(g.name, (g,), quantizable=quantizable))
        out += stacked_experts(experts, config.get("num_experts"), lambda prefix, proj: f"{prefix}.switch_mlp.{proj}.weight")
        return out, dropped
