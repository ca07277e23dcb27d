"""Step-3.7-Flash for mlx-vlm: StepFun's published names -> the module tree of mlx_vlm's step3p7 model.

Mirrors mlx-vlm 0.7.10 `mlx_vlm/models/step3p7` (`step3p7.py` `Model.sanitize`, `language.py`
`LanguageModel.sanitize`, `vision.py` `VisionModel.sanitize`): `model.language_model.` ->
`language_model.model.` with step3p5's remappings (`moe.*_proj` -> `mlp.switch_mlp.*`, `moe.gate` ->
`mlp.gate.gate`, `moe.router_bias` -> `mlp.gate.router_bias`, `share_expert` -> `mlp.share_expert`) and
zero-centred norms + 1; `lm_head.` -> `language_model.lm_head.`; `model.vision_model.` -> `vision_model.`
with `transformer.resblocks.` -> `transformer.`, `attn.in_proj_weight` -> `attn.in_proj.weight` and
convolutions transposed to MLX's [out, kh, kw, in]; `model.vit_large_projector.` -> `vit_large_projector.`;
MTP layers dropped.  The model has no cast_predicate: every float becomes the model dtype.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor, stacked_experts
from fmtconv.convert.layouts.qwen3_moe import EXPERT_KEY
from fmtconv.convert.layouts.step3p5 import is_vanilla, remap, zero_centred_to_gain
from fmtconv.convert.releases.step import HEAD_PREFIX, PROJECTOR_PREFIX, TEXT_PREFIX, VISION_CONVS, VISION_PREFIX, is_mtp
from fmtconv.formats.base import SourceGroup

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_MOE_PREFIX = re.compile(r"(?P<layer>.+)\.moe")


def to_mlx_conv(values: np.ndarray) -> np.ndarray:
    """A released convolution [out, in, kh, kw] -> MLX's [out, kh, kw, in] (a view; the pipeline makes it contiguous)."""
    return values.transpose(0, 2, 3, 1)


def vision_name(key: str) -> str:
    """A vision-tower name under `model.vision_model.` -> mlx-vlm's (VisionModel.sanitize's renames)."""
    key = key.removeprefix(VISION_PREFIX)
    key = key.replace("transformer.resblocks.", "transformer.", 1)
    key = key.replace("attn.in_proj_weight", "attn.in_proj.weight").replace("attn.in_proj_bias", "attn.in_proj.bias")
    return f"vision_model.{key}"


class Step3p7Layout(ModelLayout):
    """Step-3.7-Flash (text, vision tower, projector) for mlx-vlm's step3p7 model."""

    family = "step3p7"
    model_types = ("step3p7",)
    runtime = "mlx-vlm"
    multimodal_prefixes = ("vision_model.", "vit_large_projector.")

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        text = config.get("text_config") or {}
        n_layers = int(text["num_hidden_layers"])
        vision = config.get("vision_config") or {}
        conv_in = {"conv1.weight": int(vision.get("num_channels", 3)), "vit_downsampler1.weight": int(vision.get("width", 0)),
                   "vit_downsampler2.weight": 2 * int(vision.get("width", 0))}
        vanilla = is_vanilla([g.name for g in groups])
        out: list[TargetTensor] = []
        dropped: list[str] = []
        experts: dict[tuple[str, str], dict[int, SourceGroup]] = {}
        for g in groups:
            layer = _LAYER.search(g.name)
            if is_mtp(g.name, int(layer[1]) if layer else None, n_layers):
                dropped.append(g.name)
                continue
            if g.name.startswith(VISION_PREFIX):
                name = vision_name(g.name)
                leaf = name.removeprefix("vision_model.")
                conv = leaf in VISION_CONVS and len(g.shape) == 4 and g.shape[-1] != conv_in[leaf]
                linear = name.endswith(".weight") and len(g.shape) == 2
                out.append(TargetTensor(name, (g,), transform=to_mlx_conv if conv else None, quantizable=linear))
                continue
            if g.name.startswith(PROJECTOR_PREFIX):
                name = g.name.replace(PROJECTOR_PREFIX, "vit_large_projector.", 1)
                out.append(TargetTensor(name, (g,), quantizable=name.endswith(".weight")))
                continue
            if g.name.startswith(HEAD_PREFIX):
                out.append(TargetTensor(f"language_model.{g.name}", (g,), quantizable=g.name.endswith(".weight")))
                continue
            name = g.name.replace(TEXT_PREFIX, "language_model.model.", 1)
            m = EXPERT_KEY.fullmatch(name)
            if m and _MOE_PREFIX.fullmatch(m["prefix"]):
                experts.setdefault((m["prefix"], m["proj"]), {})[int(m["index"])] = g
                continue
            name = remap(name)
            norm = name.endswith(".weight") and "norm" in name  # the runtime's own test
            quantizable = name.endswith(".weight") and len(g.shape) >= 2 and not norm
            out.append(TargetTensor(name, (g,), transform=zero_centred_to_gain if (vanilla and norm) else None, quantizable=quantizable))
        out += stacked_experts(
            experts, text.get("moe_num_experts"),
            lambda prefix, proj: f"{_MOE_PREFIX.fullmatch(prefix)['layer']}.mlp.switch_mlp.{proj}.weight",
        )
        return out, dropped
