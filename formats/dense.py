"""Dense weights: BF16 / F16 / F32 (and F64) stored as they are; decode is exact, encode is one rounding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec, Exact, SourceGroup, row_range, values_of
from fmtconv.formats.dtypes import stored_dtype
from fmtconv.formats.parts import info_shape
from fmtconv.formats.registry import register_codec
from fmtconv.formats.rounding import COMPUTE_DTYPES, round_to_dtype

FLOAT_DTYPES = ("BF16", "F16", "F32", "F64")
# Integer / bool tensors (hash tables, position ids) are passed through, never decoded.
PASSTHROUGH_DTYPES = ("BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64")
# Parts of quantized formats: left unclaimed when their codec did not take them, so that
# grouping reports them (an orphan scale, a packed weight without its scales).
QUANT_PART_SUFFIXES = (
    ".weight_scale_inv", ".weight_scale", ".weight_scale_2", ".weight_global_scale", ".weight_packed",
    ".input_scale", ".input_global_scale", ".scales", ".biases", ".global_scale", "_blocks", "_scales",
)


def _claimable(name: str, dtype: str) -> bool:
    if name.endswith(QUANT_PART_SUFFIXES):
        return False
    if dtype in ("I8", "U8", "U32") and name.endswith(".weight"):
        return False  # a packed weight whose scales are missing
    return dtype in FLOAT_DTYPES + PASSTHROUGH_DTYPES


@register_codec
class DenseCodec(Codec):
    """Float tensors as stored; also claims integer tensors for byte-for-byte passthrough."""

    name: ClassVar[str] = "dense"
    roles: ClassVar[tuple[str, ...]] = ("weight",)
    priority: ClassVar[int] = 90

    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        return [
            SourceGroup(name, cls.name, {"weight": name}, info_shape(info), {"dtype": info.dtype})
            for name, info in tensors.items()
            if _claimable(name, info.dtype)
        ]

    def decode(self, parts, group, *, compute_dtype, rows=None) -> Exact:
        if "weight" not in parts:
            raise FmtconvError("dense: missing the weight part", tensor=group.name)
        a = np.asarray(parts["weight"])
        dname = group.params.get("dtype")
        if a.dtype.kind != "f" and a.dtype.name != "bfloat16":
            raise FmtconvError(f"dense tensor of dtype {dname or a.dtype} is not a float; copy it unchanged", tensor=group.name)
        if a.size != int(np.prod(group.shape, dtype=np.int64)):
            raise FmtconvError(f"dense: expected {group.shape}, got {a.shape}", tensor=group.name)
        total = group.rows
        start, stop = row_range(rows, total, group.name)
        a2 = a.reshape(total, -1) if group.shape else a.reshape(1, 1)
        wide = np.float64 if a.dtype == np.float64 else np.float32
        return Exact(a2[start:stop].astype(wide), np.dtype(compute_dtype), self.name, dict(group.params))

    def decode_to(self, parts, group, *, dtype, rows=None) -> np.ndarray | None:
        """Rows rounded once to `dtype` without a float32 copy (a view when the stored dtype is `dtype`): the same
        values as `decode(...).to(dtype)`; None where `decode` has something to say."""
        a = np.asarray(parts.get("weight")) if "weight" in parts else None
        if a is None or (a.dtype.kind != "f" and a.dtype.name != "bfloat16") or a.size != int(np.prod(group.shape, dtype=np.int64)):
            return None
        start, stop = row_range(rows, group.rows, group.name)
        a2 = a.reshape(group.rows, -1) if group.shape else a.reshape(1, 1)
        return round_to_dtype(a2[start:stop], dtype)

    def encode(self, values: Exact | np.ndarray, *, dtype: np.dtype | str | None = None, **_: Any) -> dict[str, np.ndarray]:
        """`{"weight": values rounded once to dtype}` (default: the Exact's compute dtype)."""
        if isinstance(dtype, str) and stored_dtype(dtype) is not None:
            dtype = stored_dtype(dtype).numpy
        dt = np.dtype(dtype) if dtype is not None else (values.compute_dtype if isinstance(values, Exact) else None)
        if dt is None or dt not in COMPUTE_DTYPES:
            raise FmtconvError(f"dense encode needs a target dtype of bfloat16, float16 or float32, got {dt}")
        return {"weight": round_to_dtype(values_of(values), dt)}


def cast_integers(values: np.ndarray, dtype: np.dtype, *, name: str | None = None) -> np.ndarray:
    """Integer (or bool) values in another integer dtype, exactly: refuses any value the target cannot hold."""
    a = np.asarray(values)
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    if a.size and dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            raise FmtconvError(f"integer values {lo}..{hi} do not fit the runtime's {dtype} ({info.min}..{info.max})", tensor=name)
    return a.astype(dtype)
