"""Group a checkpoint's stored tensors into logical weights, each with the codec that reads it.

The format facts (names, dtypes, shapes) live in each codec's `recognise`; this module only
asks the registered codecs in priority order (specific formats first, dense last), gives each
tensor to the first codec that claims it, and refuses what nobody claims.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import SourceGroup
from fmtconv.formats.registry import codec_classes


def find_groups(tensors: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> list[SourceGroup]:
    """Every stored tensor ends up in exactly one group; unclaimed tensors raise FmtconvError.

    `tensors`: name -> TensorInfo (safetensors_io); `config`: config.json (with hf_quant_config.json's
    content under `quantization_config` when only that file describes a ModelOpt checkpoint).
    Groups come back in the order of their first stored part.
    """
    config = dict(config or {})
    remaining = dict(tensors)
    groups: list[SourceGroup] = []
    for codec in codec_classes():
        for g in codec.recognise(remaining, config):
            taken = [p for p in g.parts.values() if p not in remaining]
            if taken:
                raise FmtconvError(f"tensor claimed twice (again by {g.codec} for {g.name})", tensor=taken[0])
            for p in g.parts.values():
                del remaining[p]
            groups.append(g)
    if remaining:
        name, info = next(iter(remaining.items()))
        raise FmtconvError(
            f"no format claims this {info.dtype} {tuple(info.shape)} tensor ({len(remaining)} unclaimed in all); "
            "expected it to belong to a weight (scale without its weight, or an unknown format)",
            tensor=name,
        )
    order = {n: i for i, n in enumerate(tensors)}
    groups.sort(key=lambda g: min(order[p] for p in g.parts.values()))
    return groups
