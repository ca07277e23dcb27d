"""Model layouts: per family, checkpoint names -> the module paths mlx_lm uses after sanitize()."""

from __future__ import annotations

import importlib
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.convert.layouts.generic import GenericLayout

# One module per family; each defines one ModelLayout subclass with its model_types.
_FAMILY_MODULES = ("deepseek_v4", "deepseek_v3", "gpt_oss", "step3p5", "glm4_moe_lite", "qwen3_moe")


def all_layouts() -> list[type[ModelLayout]]:
    """Every family layout class (the generic fallback last)."""
    found: list[type[ModelLayout]] = []
    for mod_name in _FAMILY_MODULES:
        try:
            mod = importlib.import_module(f"fmtconv.convert.layouts.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"fmtconv.convert.layouts.{mod_name}":
                continue
            raise
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, ModelLayout) and obj is not ModelLayout and obj.model_types:
                if obj not in found:
                    found.append(obj)
    return found + [GenericLayout]


def layout_for(config: dict[str, Any], family: str | None = None) -> ModelLayout:
    """The layout for a config's model_type (or an explicit family name); generic when none claims it."""
    model_type = config.get("model_type")
    for cls in all_layouts():
        if family is not None:
            if cls.family == family:
                return cls()
        elif model_type in cls.model_types:
            return cls()
    if family is not None and family != "generic":
        names = ", ".join(c.family for c in all_layouts())
        from fmtconv.errors import FmtconvError

        raise FmtconvError(f"unknown layout family {family!r} (known: {names})")
    return GenericLayout()


__all__ = ["ModelLayout", "TargetTensor", "GenericLayout", "all_layouts", "layout_for"]
