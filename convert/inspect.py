"""`fmtconv inspect`: what a checkpoint holds, tensor group by tensor group, without reading data."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from fmtconv.formats.safetensors_io import Checkpoint, TensorInfo

# Suffixes of the stored parts that belong to one logical weight (FP8 / MXFP4 / NVFP4 / MLX layouts).
_PART_SUFFIX = re.compile(
    r"(\.(weight|weight_scale_inv|weight_scale|weight_scale_2|weight_packed|weight_global_scale|"
    r"input_scale|scale|scales|biases)|_blocks|_scales)$"
)


def group_key(name: str) -> str:
    """The logical weight a stored tensor belongs to (its name without the part suffix)."""
    return _PART_SUFFIX.sub("", name)


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Per tensor group: its parts (name, dtype, shape, bytes); plus counts and bytes per dtype."""
    with Checkpoint(path) as ck:
        groups: dict[str, list[TensorInfo]] = defaultdict(list)
        for info in ck.tensors.values():
            groups[group_key(info.name)].append(info)
        by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "bytes": 0})
        for info in ck.tensors.values():
            by_dtype[info.dtype]["tensors"] += 1
            by_dtype[info.dtype]["bytes"] += info.nbytes
        return {
            "path": str(path),
            "files": sorted(ck.files),
            "groups": [
                {
                    "group": key,
                    "parts": [
                        {"name": i.name, "dtype": i.dtype, "shape": list(i.shape), "bytes": i.nbytes}
                        for i in sorted(parts, key=lambda i: i.name)
                    ],
                }
                for key, parts in sorted(groups.items())
            ],
            "summary": {
                "tensors": len(ck.tensors),
                "groups": len(groups),
                "bytes": sum(i.nbytes for i in ck.tensors.values()),
                "by_dtype": dict(sorted(by_dtype.items())),
            },
        }
