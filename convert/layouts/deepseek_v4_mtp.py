"""DeepSeek-V4's MTP layer as a drafter bundle for mlx-vlm's deepseek_v4_mtp drafter (`--mtp`).

Mirrors mlx-vlm 0.7.10 `mlx_vlm/speculative/drafters/deepseek_v4_mtp` (`DeepseekV4MTPDraftModel.__init__` and
`.sanitize`, `config.py` `DeepseekV4MTPConfig`): the `mtp.0.` prefix stripped; `e_proj`, `h_proj`, `enorm`, `hnorm`
and `norm` at the top; `hc_head_{fn,base,scale}` -> `hc_head.*`; the layer's `attn.*`, `attn_norm`, `ffn.*`,
`ffn_norm` under `decoder.` (a DeepseekV4Block) with the main model's renames (`hc_{attn,ffn}_P` ->
`decoder.{attn,ffn}_hc.P`, `ffn.gate.bias` -> `e_score_correction_bias`, shared experts `w1/w2/w3` ->
`gate/down/up_proj`), routed experts stacked into `decoder.ffn.switch_mlp.*` and `wo_a` reshaped to its
MultiLinear's 3-D [o_groups, o_lora_rank, in].  The config is `{model_type: deepseek_v4_mtp, text_config: <the
main model's keys>, block_size}`: the drafter builds one local-attention block from the text config (no
compressor, indexer or hash routing) and takes its embedding and head from the main model at generation time.
"""

from __future__ import annotations

import functools
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, drafter_config, stacked_experts
from fmtconv.convert.layouts.deepseek_v4 import DeepseekV4Layout, is_quantizable, vlm_name
from fmtconv.convert.releases.deepseek_v4 import EXPERT_PROJ, HC_PARAMS, MTP_EXPERT_KEY, MTP_OWN, mtp_part, split_o_groups
from fmtconv.errors import FmtconvError
from fmtconv.formats.base import SourceGroup

DRAFTER_MODEL_TYPE = "deepseek_v4_mtp"
_TOP = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight",
        *(f"hc_head_{p}" for p in HC_PARAMS)}
_MAIN_PREFIX = "language_model.model."


def drafter_name(rest: str) -> str:
    """A name within the MTP layer (`mtp.0.` stripped) -> its name in the drafter."""
    if rest in _TOP:
        return rest.replace("hc_head_", "hc_head.")
    # The block is a main layer's DeepseekV4Block: the main layout's renames, under `decoder.` instead of a layer.
    return "decoder." + vlm_name(f"layers.0.{rest}").removeprefix(f"{_MAIN_PREFIX}layers.0.")


def _quantizable(name: str) -> bool:
    """The drafter's Linear / MultiLinear / SwitchLinear modules: the block's, and `e_proj` / `h_proj`."""
    return name in ("e_proj.weight", "h_proj.weight") or is_quantizable(name)


class DeepseekV4MtpLayout(ModelLayout):
    """DeepSeek-V4-Flash's `mtp.0.*` for mlx-vlm's deepseek_v4_mtp drafter model."""

    family = DRAFTER_MODEL_TYPE
    model_types = (DRAFTER_MODEL_TYPE,)
    runtime = "mlx-vlm"
    draft_kind = "mtp"
    explicit_quantization = True
    # The drafter declares no cast_predicate; its block is the main model's DeepseekV4Block, whose predicate
    # (language.py LanguageModel.cast_predicate) keeps these float32, as mlx-vlm's own splitter writes them.
    uncast = ("attn_sink", "e_score_correction_bias", ".attn_hc.", ".ffn_hc.", "hc_head.")
    mlx_vlm_wraps = False

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        o_groups = int(config.get("o_groups", 1))
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            part = mtp_part(g.name)
            if part is None:
                continue  # the main model's weights: the main bundle's
            layer, rest = part
            if layer != 0:  # the drafter holds one MTP block (num_hidden_layers 1)
                dropped.append(g.name)
                continue
            m = MTP_EXPERT_KEY.fullmatch(rest)
            if m:
                experts.setdefault(("decoder.ffn", m[2]), {})[int(m[1])] = g
                continue
            name = drafter_name(rest)
            transform = functools.partial(split_o_groups, groups=o_groups) if name == "decoder.attn.wo_a.weight" else None
            out.append(TargetTensor(name, (g,), transform=transform, quantizable=_quantizable(name)))
        if not out and not experts:
            looked = ", ".join(f"mtp.0.{n}" for n in MTP_OWN)
            raise FmtconvError(f"the source has no MTP layer: no tensor named mtp.0.* (looked for {looked} and the "
                               "layer's attn.* / ffn.* tensors under mtp.0.)")
        out += stacked_experts(experts, config.get("n_routed_experts"),
                               lambda prefix, proj: f"{prefix}.switch_mlp.{EXPERT_PROJ[proj]}.weight")
        return out, dropped

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The drafter's config.json (mlx-vlm split_mtp writes the same keys): the main model's as text_config."""
        return drafter_config(DRAFTER_MODEL_TYPE, DeepseekV4Layout().output_config(config))


__all__ = ["DRAFTER_MODEL_TYPE", "DeepseekV4MtpLayout", "drafter_name"]
