"""GLM-4.7-Flash's MTP layer as a drafter bundle for mlx-vlm's glm4_moe_lite_mtp drafter (`--mtp`).

mlx-vlm 0.7.10 ships this drafter's config and splitter but no model class (`speculative/drafters/
glm4_moe_lite_mtp` has config.py and split.py only), so `--mtp` on GLM-4.7-Flash is refused while the installed
mlx-vlm lacks the class (fmtconv.convert.layouts.drafter_layout_for); once it has one, the conformance check
against that class runs before the bundle becomes its directory.  The names follow mlx-vlm's own splitter
(`glm4_moe_lite_mtp/split.py`: `_flat_name`, `_split_kv_b_proj`, `_stack_experts`), which tests compare against:
`model.layers.<num_hidden_layers>.` + `embed_tokens` -> `model.embed_tokens`, `enorm` / `hnorm` / `eh_proj` ->
`model.*`, `shared_head.norm` -> `model.shared_head_norm`, `shared_head.head` -> `lm_head`, the rest under
`model.mtp_block.` with `kv_b_proj` split into `embed_q` / `unembed_out` and routed experts stacked into
`mlp.switch_mlp.*`.  Which modules the drafter class quantizes is not knowable before it exists: the block's as
in mlx-lm's glm4_moe_lite (fmtconv.convert.layouts.glm4_moe_lite), plus `eh_proj`, `embed_tokens` and `lm_head`.
"""

from __future__ import annotations

import functools
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, drafter_config, stacked_experts
from fmtconv.convert.layouts.deepseek_v3 import embed_q, unembed_out
from fmtconv.convert.layouts.glm4_moe_lite import Glm4MoeLiteLayout, is_block_quantizable
from fmtconv.convert.layouts.qwen3_moe import EXPERT_KEY
from fmtconv.errors import FmtconvError
from fmtconv.formats.base import SourceGroup

DRAFTER_MODEL_TYPE = "glm4_moe_lite_mtp"
_OWN = {"embed_tokens.weight": "model.embed_tokens.weight", "enorm.weight": "model.enorm.weight",
        "hnorm.weight": "model.hnorm.weight", "eh_proj.weight": "model.eh_proj.weight",
        "shared_head.norm.weight": "model.shared_head_norm.weight", "shared_head.head.weight": "lm_head.weight"}
_QUANTIZABLE_OWN = {"model.embed_tokens.weight", "model.eh_proj.weight", "lm_head.weight"}
_BLOCK = "model.mtp_block."


class Glm4MoeLiteMtpLayout(ModelLayout):
    """GLM-4.7-Flash's `model.layers.<num_hidden_layers>.*` for mlx-vlm's glm4_moe_lite_mtp drafter model."""

    family = DRAFTER_MODEL_TYPE
    model_types = (DRAFTER_MODEL_TYPE,)
    runtime = "mlx-vlm"
    draft_kind = "mtp"
    explicit_quantization = True
    uncast = ("e_score_correction_bias",)  # the splitter keeps it float32 ("casting it breaks routing")
    mlx_vlm_wraps = False

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        layer = f"model.layers.{int(config['num_hidden_layers'])}."
        heads, nope = int(config["num_attention_heads"]), int(config["qk_nope_head_dim"])
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            if not g.name.startswith(layer):
                continue
            rest = g.name[len(layer):]
            if rest.endswith("rotary_emb.inv_freq"):
                dropped.append(g.name)
                continue
            m = EXPERT_KEY.fullmatch(g.name)
            if m:
                experts.setdefault((_BLOCK + m["prefix"][len(layer):], m["proj"]), {})[int(m["index"])] = g
                continue
            if rest == "self_attn.kv_b_proj.weight":
                for leaf, fn in (("embed_q", embed_q), ("unembed_out", unembed_out)):
                    out.append(TargetTensor(f"{_BLOCK}self_attn.{leaf}.weight", (g,), transform=functools.partial(fn, heads=heads, nope=nope),
                                            quantizable=True))
                continue
            name = _OWN.get(rest, _BLOCK + rest)
            quantizable = name in _QUANTIZABLE_OWN or (name.startswith(_BLOCK) and is_block_quantizable(g.name, g.shape))
            out.append(TargetTensor(name, (g,), quantizable=quantizable))
        if not out and not experts:
            looked = ", ".join(f"{layer}{n}" for n in _OWN)
            raise FmtconvError(f"the source has no MTP layer: no tensor named {layer}* (looked for {looked} and the layer's "
                               f"self_attn.* / mlp.* tensors under {layer})")
        out += stacked_experts(experts, config.get("n_routed_experts"), lambda prefix, proj: f"{prefix}.switch_mlp.{proj}.weight")
        return out, dropped

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The drafter's config.json as mlx-vlm's splitter writes it: the main model's keys as text_config."""
        return drafter_config(DRAFTER_MODEL_TYPE, Glm4MoeLiteLayout().output_config(config))
