"""What a model layout is: the mapping from a release's logical weights to the tensors one runtime's model holds.

A layout is written for one runtime (`mlx-lm`, `mlx-vlm` or `vmlx`, fmtconv.convert.runtimes) and mirrors its
model module's module tree; the release's own naming facts live in fmtconv.convert.releases.  The mlx-lm and
mlx-vlm layouts store the runtime's post-sanitize names; the vMLX one stores the release's own names, which
its runtime's sanitize renames (`runtime_name`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import SourceGroup


@dataclass(frozen=True)
class TargetTensor:
    """One tensor of the output bundle, under the name it is stored with (ModelLayout.runtime_name: its runtime path)."""

    name: str  # e.g. "model.layers.0.mlp.switch_mlp.gate_proj.weight"
    sources: tuple[SourceGroup, ...]  # more than one: stacked along a new leading axis, in order
    # Slice (start, stop, step) along axis -2 of each source before stacking (gpt-oss gate/up de-interleave).
    rows: tuple[int | None, int | None, int | None] | None = None
    # Whole-tensor transform on decoded dense values (forces decode; for small tensors only).
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    # True when the runtime module holding this weight has `to_quantized` (Linear, Embedding, SwitchLinear).
    quantizable: bool = False

    @property
    def module(self) -> str:
        """The stored module path: the prefix of the module's `.weight`, `.scales` and `.biases` in the shards."""
        return self.name.rsplit(".", 1)[0]


class ModelLayout:
    """Per model family: checkpoint names -> post-sanitize names (experts stacked), and config rewriting."""

    family: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    # The runtime whose model module this layout mirrors (its name in fmtconv.convert.runtimes.RUNTIMES).
    runtime: ClassVar[str] = "mlx-lm"
    # Substrings of tensor names the runtime keeps in their stored dtype instead of casting to the
    # model dtype (mirrors the model's `cast_predicate`).
    uncast: ClassVar[tuple[str, ...]] = ()
    # Integer tensors the runtime's model holds in another dtype: name substring -> safetensors dtype.
    integer_dtypes: ClassVar[dict[str, str]] = {}
    # mlx-lm layouts: whether mlx-vlm's model of the same model_type is mlx-lm's tree under `language_model.`
    # (fmtconv.convert.layouts.mlx_vlm_wrapped), so `--runtime mlx-vlm` can reuse this layout.
    mlx_vlm_wraps: ClassVar[bool] = True
    # Module-path prefixes of vision towers and projectors: a runtime's own converter keeps them dense,
    # and so do fmtconv's recipes unless a rule names them explicitly.
    multimodal_prefixes: ClassVar[tuple[str, ...]] = ()
    # Drafter layouts (`--mtp`): the runtime's speculative-decoding kind ("mtp"); None for a model's own layout.
    draft_kind: ClassVar[str | None] = None
    # Whether config.json's `quantization` block names every quantized module, not only those off the default (a
    # drafter's: mlx-vlm applies a bare default only by heuristics; vMLX's: jang's loader is keyed by its own paths).
    explicit_quantization: ClassVar[bool] = False

    def runtime_name(self, name: str) -> str:
        """The parameter path the runtime's sanitize() gives the stored tensor `name` (these layouts store
        post-sanitize names, so the name itself)."""
        return name

    def runtime_module(self, module: str) -> str:
        """The runtime's module path for a stored module path: what recipes match and quantization keys name."""
        return self.runtime_name(f"{module}.weight").rsplit(".", 1)[0]

    def keeps_source_dtype(self, name: str) -> bool:
        return any(s in name for s in self.uncast)

    def integer_dtype(self, name: str, stored: str) -> str:
        """The safetensors dtype the runtime's model holds an integer tensor in (default: as stored)."""
        return next((dt for s, dt in self.integer_dtypes.items() if s in name), stored)

    def is_multimodal(self, name: str) -> bool:
        return name.startswith(self.multimodal_prefixes) if self.multimodal_prefixes else False

    def targets(self, groups: list[SourceGroup], config: dict[str, Any]) -> tuple[list[TargetTensor], list[str]]:
        """The output tensors, and the checkpoint names of weights deliberately dropped (e.g. MTP layers)."""
        raise NotImplementedError

    def output_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The source config adjusted for the runtime (quantization blocks are the converter's job)."""
        return dict(config)


def drafter_config(model_type: str, text: dict[str, Any]) -> dict[str, Any]:
    """A drafter bundle's config.json, with the keys mlx-vlm's MTP splitter writes (speculative/drafters/mtp_split.py):
    the drafter's model_type, the main model's config as `text_config`, and `block_size` at the drafter configs' own
    default (one drafted token per MTP layer, plus the verified one)."""
    return {"model_type": model_type, "torch_dtype": text.get("torch_dtype", "bfloat16"), "text_config": text,
            "block_size": int(text.get("num_nextn_predict_layers", 1)) + 1,
            "tie_word_embeddings": bool(text.get("tie_word_embeddings", False))}


def stacked_experts(
    groups: dict[tuple[str, str], dict[int, SourceGroup]],
    n_experts: int | None,
    target: Callable[[str, str], str],
) -> list[TargetTensor]:
    """One stacked SwitchLinear weight per (prefix, proj), sources in expert order 0..n-1.

    `groups` maps (prefix, proj) -> {expert index: group}; `target(prefix, proj)` names the output.
    """
    out = []
    for (prefix, proj), by_index in sorted(groups.items()):
        want = int(n_experts) if n_experts is not None else len(by_index)
        if sorted(by_index) != list(range(want)):
            missing = sorted(set(range(want)) - set(by_index))
            raise FmtconvError(
                f"{prefix} has {len(by_index)} {proj} experts, expected 0..{want - 1}; missing {missing[:8]}",
                tensor=f"{prefix}.experts.*.{proj}.weight",
            )
        shapes = {by_index[i].shape for i in range(want)}
        if len(shapes) != 1:
            raise FmtconvError(f"{prefix} {proj} experts differ in shape: {sorted(shapes)}", tensor=f"{prefix}.experts.*.{proj}.weight")
        out.append(TargetTensor(target(prefix, proj), tuple(by_index[i] for i in range(want)), quantizable=True))
    return out
