"""Step-3.5 / Step-3.7 layout: StepFun names -> the names mlx_lm's step3p5 model uses after sanitize().

Mirrors mlx_lm 0.32.2 `mlx_lm/models/step3p5.py` `Model.sanitize`:
- `moe.{gate,up,down}_proj` -> `mlp.switch_mlp.*`, `moe.gate.` -> `mlp.gate.gate.`,
  `moe.router_bias` -> `mlp.gate.router_bias`, `share_expert.` -> `mlp.share_expert.`;
- MTP weights (`.mtp`, and layers >= num_hidden_layers) dropped;
- in a checkpoint with StepFun's own names ("vanilla"), every norm `.weight` is stored zero-centred
  and the runtime weight is stored + 1.
The BF16 release stacks the routed experts ([E, out, in] under `moe.gate_proj.weight`); quantized
releases made by LLM Compressor store them per expert, `moe.experts.E.{gate,up,down}_proj`
(vLLM `step3p5.py` load_weights, "new per-expert format"), which are stacked here in expert order.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.convert.layouts.base import stacked_experts
from fmtconv.convert.layouts.qwen3_moe import EXPERT_KEY
from fmtconv.formats.base import SourceGroup

# (published, post-sanitize) substrings, in mlx_lm's order (first match wins).
REMAPPINGS = (
    (".moe.gate_proj.", ".mlp.switch_mlp.gate_proj."),
    (".moe.up_proj.", ".mlp.switch_mlp.up_proj."),
    (".moe.down_proj.", ".mlp.switch_mlp.down_proj."),
    (".moe.gate.", ".mlp.gate.gate."),
    (".moe.router_bias", ".mlp.gate.router_bias"),
    (".share_expert.", ".mlp.share_expert."),
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_MOE_PREFIX = re.compile(r"(?P<layer>.+)\.moe")


def remap(name: str) -> str:
    """One StepFun name under its post-sanitize name (the first remapping that applies)."""
    for src, dst in REMAPPINGS:
        if src in name and dst not in name:
            return name.replace(src, dst)
    return name


def zero_centred_to_gain(values: np.ndarray) -> np.ndarray:
    """A stored zero-centred norm weight -> the runtime's gain (w + 1), rounded once to its dtype."""
    return (values.astype(np.float32) + np.float32(1.0)).astype(values.dtype)


def is_vanilla(names: list[str]) -> bool:
    """StepFun's own naming (as sanitize decides it): some published substring not yet remapped."""
    return any(src in n and dst not in n for n in names for src, dst in REMAPPINGS) or any(".moe.experts." in n for n in names)


class Step3p5Layout(ModelLayout):
    """Step-3.5-Flash and Step-3.7-Flash text weights (BF16, FP8, compressed-tensors) for mlx_lm's step3p5."""

    family = "step3p5"
    model_types = ("step3p5",)
    uncast = ("router_bias",)  # step3p5 Model.cast_predicate

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        n_layers = int(config["num_hidden_layers"])
        vanilla = is_vanilla([g.name for g in groups])
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            layer = _LAYER.match(g.name)
            if ".mtp" in g.name or (layer and int(layer[1]) >= n_layers):
                dropped.append(g.name)
                continue
            m = EXPERT_KEY.fullmatch(g.name)
            if m and _MOE_PREFIX.fullmatch(m["prefix"]):
                experts.setdefault((m["prefix"], m["proj"]), {})[int(m["index"])] = g
                continue
            name = remap(g.name)
            norm = name.endswith(".weight") and "norm" in name  # sanitize's own test
            transform = zero_centred_to_gain if (vanilla and norm) else None
            quantizable = name.endswith(".weight") and len(g.shape) >= 2 and not norm
            out.append(TargetTensor(name, (g,), transform=transform, quantizable=quantizable))
        out += stacked_experts(
            experts,
            config.get("moe_num_experts"),
            lambda prefix, proj: f"{_MOE_PREFIX.fullmatch(prefix)['layer']}.mlp.switch_mlp.{proj}.weight",
        )
        return out, dropped
