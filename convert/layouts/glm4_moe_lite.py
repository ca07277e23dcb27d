"""GLM-4.7-Flash layout: zai-org names -> the names mlx_lm's glm4_moe_lite model uses after sanitize().

Mirrors mlx_lm 0.32.2 `mlx_lm/models/glm4_moe_lite.py` `Model.sanitize`: layers with index >=
num_hidden_layers (the MTP layer) dropped; routed experts `mlp.experts.E.{gate,up,down}_proj`
stacked in expert order into `mlp.switch_mlp.*`; `self_attn.kv_b_proj` split into `embed_q` (key
half, transposed per head) and `unembed_out` (value half), the same split as deepseek_v3's.
Quantizable: nn.Linear / nn.Embedding / MultiLinear / SwitchLinear modules; not the router
`mlp.gate` (a MoEGate holding a bare weight), norms or `e_score_correction_bias`.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.convert.layouts.deepseek_v3 import embed_q, unembed_out
from fmtconv.convert.layouts.base import stacked_experts
from fmtconv.convert.layouts.qwen3_moe import EXPERT_KEY, is_norm
from fmtconv.formats.base import SourceGroup

_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_KV_B = re.compile(r"(?P<attn>model\.layers\.\d+\.self_attn)\.kv_b_proj\.weight")
_ROUTER = re.compile(r".+\.mlp\.gate\.weight")


def is_block_quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether a decoder layer's weight sits in a module with `to_quantized`: 2-D and up, not a norm or the router."""
    return name.endswith(".weight") and len(shape) >= 2 and not is_norm(name) and not _ROUTER.fullmatch(name)


class Glm4MoeLiteLayout(ModelLayout):
    """GLM-4.7-Flash (BF16 or FP8-block releases) for mlx_lm's glm4_moe_lite model."""

    family = "glm4_moe_lite"
    model_types = ("glm4_moe_lite",)
    uncast = ("e_score_correction_bias",)  # glm4_moe_lite Model.cast_predicate

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        n_layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        nope = int(config["qk_nope_head_dim"])
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            layer = _LAYER.match(g.name)
            if layer and int(layer[1]) >= n_layers:
                dropped.append(g.name)
                continue
            m = EXPERT_KEY.fullmatch(g.name)
            if m:
                experts.setdefault((m["prefix"], m["proj"]), {})[int(m["index"])] = g
                continue
            kv = _KV_B.fullmatch(g.name)
            if kv:
                for leaf, fn in (("embed_q", embed_q), ("unembed_out", unembed_out)):
                    transform = functools.partial(fn, heads=heads, nope=nope)
                    out.append(TargetTensor(f"{kv['attn']}.{leaf}.weight", (g,), transform=transform, quantizable=True))
                continue
            out.append(TargetTensor(g.name, (g,), quantizable=is_block_quantizable(g.name, g.shape)))
        out += stacked_experts(experts, config.get("n_routed_experts"), lambda prefix, proj: f"{prefix}.switch_mlp.{proj}.weight")
        return out, dropped
