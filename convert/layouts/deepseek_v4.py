"""DeepSeek-V4 for mlx-vlm: DeepSeek's published names -> the module tree of mlx_vlm's deepseek_v4 model.

Mirrors mlx-vlm 0.7.10 `mlx_vlm/models/deepseek_v4` (`language.py` `LanguageModel.sanitize`,
`deepseek_v4.py` `Model.sanitize`): everything under `language_model.`; `embed`/`head`/`norm` ->
`model.embed_tokens`/`lm_head`/`model.norm`; `hc_head_{fn,base,scale}` -> `model.hc_head.*`;
`layers.N.` -> `model.layers.N.` with attention, compressor and indexer names kept (`attn.wq_a`, ...),
`hc_{attn,ffn}_P` -> `{attn,ffn}_hc.P`, `ffn.gate.bias` -> `ffn.gate.e_score_correction_bias`,
shared experts `w1/w2/w3` -> `gate/down/up_proj`, routed experts stacked into
`ffn.switch_mlp.{gate,down,up}_proj` in expert order, `attn.wo_a` reshaped to the 3-D
[o_groups, o_lora_rank, in] of its MultiLinear, `tid2eid` held as int32, and MTP layers and layers
beyond num_hidden_layers dropped.
"""

from __future__ import annotations

import functools
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, stacked_experts
from fmtconv.convert.releases.deepseek_v4 import EXPERT_PROJ, HC_PARAMS, split_groups, split_o_groups, without_fp4_experts
from fmtconv.formats.base import SourceGroup

_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight", "norm.weight": "model.norm.weight",
        **{f"hc_head_{p}": f"model.hc_head.{p}" for p in HC_PARAMS}}
_RENAMES = (
    *((f".hc_{sub}_{p}", f".{sub}_hc.{p}") for sub in ("attn", "ffn") for p in HC_PARAMS),
    (".ffn.gate.bias", ".ffn.gate.e_score_correction_bias"),
    *((f".shared_experts.{w}.", f".shared_experts.{proj}.") for w, proj in EXPERT_PROJ.items()),
)
# Modules of the mlx-vlm model with `to_quantized` (nn.Linear, MultiLinear, SwitchLinear, nn.Embedding), by leaf.
# Not: the router `ffn.gate` (MoEGate, a plain Module), norms, hyper-connections, `ape`, sinks.
_QUANTIZABLE_LEAVES = frozenset(
    {"wq_a", "wq_b", "wkv", "wo_a", "wo_b", "wgate", "weights_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
)


def vlm_name(key: str) -> str:
    """One published DeepSeek-V4 name -> its name in mlx_vlm's deepseek_v4 model."""
    if key in _TOP:
        return f"language_model.{_TOP[key]}"
    key = f".{key}"
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return f"language_model.model{key}"


def is_quantizable(name: str) -> bool:
    if not name.endswith(".weight"):
        return False
    return name[: -len(".weight")].rsplit(".", 1)[-1] in _QUANTIZABLE_LEAVES


class DeepseekV4Layout(ModelLayout):
    """DeepSeek-V4-Flash as published, for mlx-vlm's deepseek_v4 model (the runtime that owns the model_type)."""

    family = "deepseek_v4"
    model_types = ("deepseek_v4",)
    runtime = "mlx-vlm"
    # language.py LanguageModel.cast_predicate: kept in their stored dtype (float32 in the release).
    uncast = ("attn_sink", "e_score_correction_bias", "bias_vl", ".attn_hc.", ".ffn_hc.", ".hc_head.")
    # MoEGate holds the hash-routing table as int32 (sanitize casts the release's I64 to it).
    integer_dtypes = {"tid2eid": "I32"}

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        o_groups = int(config.get("o_groups", 1))
        whole, experts, dropped = split_groups(groups, int(config["num_hidden_layers"]))
        out: list[TargetTensor] = []
        for g in whole:
            name = vlm_name(g.name)
            transform = functools.partial(split_o_groups, groups=o_groups) if name.endswith(".attn.wo_a.weight") else None
            out.append(TargetTensor(name, (g,), transform=transform, quantizable=is_quantizable(name)))
        out += stacked_experts(
            experts, config.get("n_routed_experts"),
            lambda prefix, proj: f"language_model.model.{prefix}.switch_mlp.{EXPERT_PROJ[proj]}.weight",
        )
        return out, dropped

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return without_fp4_experts(config)
