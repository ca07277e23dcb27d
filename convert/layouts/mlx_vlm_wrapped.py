"""An mlx-lm layout written for mlx-vlm's wrapper of the same text model (`--runtime mlx-vlm`).

Mirrors the `Model.sanitize` of mlx-vlm 0.7.10's text-model wrappers (e.g. `mlx_vlm/models/qwen3_moe/
qwen3_moe.py`, `deepseek_v3.py`, `gpt_oss.py`): the language model is mlx-lm's module tree under
`language_model.`, so `model.*` and `lm_head.*` become `language_model.model.*` and
`language_model.lm_head.*`.  The conformance check against the mlx-vlm model class proves it per bundle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.formats.base import SourceGroup

PREFIX = "language_model."


def wrapped_name(name: str) -> str:
    return name if name.startswith(PREFIX) else f"{PREFIX}{name}"


class MlxVlmWrapped(ModelLayout):
    """`inner`'s targets, under mlx-vlm's `language_model.` prefix."""

    runtime = "mlx-vlm"

    def __init__(self, inner: ModelLayout):
        self.inner = inner
        self.family = inner.family
        self.model_types = inner.model_types
        self.integer_dtypes = inner.integer_dtypes

    def keeps_source_dtype(self, name: str) -> bool:
        return self.inner.keeps_source_dtype(name.removeprefix(PREFIX))

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        targets, dropped = self.inner.targets(groups, config)
        return [dataclasses.replace(t, name=wrapped_name(t.name)) for t in targets], dropped

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return self.inner.output_config(config)
