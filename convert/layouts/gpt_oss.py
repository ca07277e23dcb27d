"""gpt-oss layout: openai/gpt-oss names -> the names mlx_lm's gpt_oss model uses after sanitize().

Mirrors mlx_lm 0.32.2 `mlx_lm/models/gpt_oss.py` `Model.sanitize`: the fused expert tensor
`mlp.experts.gate_up_proj` [E, 2*I, H] (rows interleaved: gate even, up odd) becomes
`mlp.experts.gate_proj.weight` = rows 0::2 and `mlp.experts.up_proj.weight` = rows 1::2 (axis -2);
its bias `gate_up_proj_bias` [E, 2*I] splits the same way along its last axis; `down_proj` and
`down_proj_bias` get `.weight` / `.bias`. The experts are already stacked (SwitchGLU `experts`).
Quantizable: attention projections, the router (nn.Linear), the experts, embedding and lm_head.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.formats.base import SourceGroup

# Logical names of the expert weights (MXFP4 `X_blocks` + `X_scales`, or a dense `X` / `X.weight`).
_EXPERT_WEIGHT = re.compile(r"(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?")
_EXPERT_BIAS = re.compile(r"(?P<prefix>.+\.mlp\.experts)\.(?P<proj>gate_up_proj|down_proj)_bias")
_QUANTIZABLE_LEAVES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "router", "embed_tokens", "lm_head"})

GATE_ROWS = (0, None, 2)  # gpt_oss.sanitize: gate_proj = gate_up[..., ::2, :]
UP_ROWS = (1, None, 2)  # up_proj = gate_up[..., 1::2, :]


def gate_bias(values: np.ndarray) -> np.ndarray:
    """gate_up_proj_bias [..., 2*I] -> gate_proj.bias [..., I] (even entries)."""
    return np.ascontiguousarray(values[..., 0::2])


def up_bias(values: np.ndarray) -> np.ndarray:
    """gate_up_proj_bias [..., 2*I] -> up_proj.bias [..., I] (odd entries)."""
    return np.ascontiguousarray(values[..., 1::2])


class GptOssLayout(ModelLayout):
    """openai/gpt-oss-20b / -120b (MXFP4 experts, bf16 rest) for mlx_lm's gpt_oss model."""

    family = "gpt_oss"
    model_types = ("gpt_oss",)

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        out: list[TargetTensor] = []
        for g in groups:
            w = _EXPERT_WEIGHT.fullmatch(g.name)
            b = _EXPERT_BIAS.fullmatch(g.name)
            if w and w["proj"] == "gate_up_proj":
                out.append(TargetTensor(f"{w['prefix']}.gate_proj.weight", (g,), rows=GATE_ROWS, quantizable=True))
                out.append(TargetTensor(f"{w['prefix']}.up_proj.weight", (g,), rows=UP_ROWS, quantizable=True))
            elif w:
                out.append(TargetTensor(f"{w['prefix']}.down_proj.weight", (g,), quantizable=True))
            elif b and b["proj"] == "gate_up_proj":
                out.append(TargetTensor(f"{b['prefix']}.gate_proj.bias", (g,), transform=gate_bias))
                out.append(TargetTensor(f"{b['prefix']}.up_proj.bias", (g,), transform=up_bias))
            elif b:
                out.append(TargetTensor(f"{b['prefix']}.down_proj.bias", (g,)))
            else:
                module = g.name.rsplit(".", 1)[0]
                quantizable = g.name.endswith(".weight") and module.rsplit(".", 1)[-1] in _QUANTIZABLE_LEAVES
                out.append(TargetTensor(g.name, (g,), quantizable=quantizable))
        return out, []
