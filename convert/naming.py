"""Names of modules: their pattern with layer and expert indices folded, and natural (numeric-aware) order."""

from __future__ import annotations

import re

_LAYER_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def module_pattern(name: str) -> str:
    """The name with every numeric path component (layer, expert) replaced by `{i}`."""
    return _LAYER_INDEX.sub("{i}", name)


def natural_key(s: str) -> list:
    """Sort key that orders `layers.10` after `layers.9`."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]
