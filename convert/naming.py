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


# The module classes a quality report and a size budget speak of, matched in order against a module path of any runtime
# (mlx-lm, mlx-vlm, vMLX trees); the first match names the class.
MODULE_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vision", re.compile(r"^(vision_model|vision_tower|vit_large_projector|multi_modal_projector)\b")),
    ("embedding", re.compile(r"(^|\.)(embed_tokens|embed|wte|tok_embeddings)$")),
    ("head", re.compile(r"(^|\.)(lm_head|head)$")),
    ("compressor", re.compile(r"\.(compressor|indexer)\.")),
    ("routed experts", re.compile(r"(switch_mlp|\.experts)\.")),
    ("shared experts", re.compile(r"(shared_experts?|share_expert)\.")),
    ("router", re.compile(r"\.(mlp|ffn|moe)\.(gate|router)(\.gate)?$")),
    ("attention", re.compile(r"\.(self_attn|attn|attention)\.")),
    ("mlp", re.compile(r"\.(mlp|ffn|feed_forward)\.")),
)


def module_class(path: str) -> str:
    """The class of a module path: embedding, head, attention, compressor (DeepSeek-V4's compressor and indexer),
    router, routed experts, shared experts, mlp (a dense MLP), vision, or other."""
    return next((name for name, pattern in MODULE_CLASSES if pattern.search(path)), "other")
