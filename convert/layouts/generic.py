"""The fallback layout: names kept as the checkpoint has them, quantizability guessed from shape."""

from __future__ import annotations

import re
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.formats.base import SourceGroup

# Weights that are never Linear/Embedding modules even when 2-D (norms, routers' score corrections, ...).
_NOT_LINEAR = re.compile(r"norm|\.gate\.weight$|router|bias$|_bias|sinks|e_score_correction")


class GenericLayout(ModelLayout):
    """Keeps every name; a 2-D `*.weight` that is not a norm or router is taken as a linear layer."""

    family = "generic"
    # The names mlx_lm's MoE models most often keep uncast (deepseek_v3, glm4_moe_lite, afmoe, ... cast_predicate).
    uncast = ("e_score_correction_bias", "expert_bias")

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        out = []
        for g in groups:
            quantizable = g.name.endswith(".weight") and len(g.shape) >= 2 and not _NOT_LINEAR.search(g.name)
            out.append(TargetTensor(name=g.name, sources=(g,), quantizable=quantizable))
        return out, []
