"""The shared surface of every codec: the exact intermediate, stored-part groups, the codec base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class Exact:
    """A block of rows of one logical weight, holding exactly the values the source encodes.

    `values` is float32 where the source's products are exact in it (FP4/FP8 x E8M0, dense
    bf16/f16/f32) and float64 where they are not (FP8 x an arbitrary float32 scale).
    Shape: (rows, last_dim) for a row block, or the logical shape for a whole tensor.
    """

    values: np.ndarray
    compute_dtype: np.dtype
    codec: str
    params: dict[str, Any] = field(default_factory=dict)
    # The source's own codes and scales, kept where the values alone do not determine them
    # (MLX affine 8-bit in bfloat16: two codes of a group can dequantize to the same value).
    factored: dict[str, np.ndarray] | None = None

    def to(self, dtype: np.dtype | None = None, *, like_mlx_lm: bool = False) -> np.ndarray:
        """Round once, to nearest-even, to `dtype` (default: the compute dtype).

        like_mlx_lm=True: round to float32, then bfloat16, then `dtype`, as mlx_lm's sanitize()
        does when it multiplies FP8 by a float32 scale (see formats/rounding.py).
        """
        from fmtconv.formats.rounding import round_like_mlx_lm, round_to_dtype

        target = np.dtype(dtype or self.compute_dtype)
        return round_like_mlx_lm(self.values, target) if like_mlx_lm else round_to_dtype(self.values, target)


@dataclass(frozen=True)
class SourceGroup:
    """The stored parts of one logical weight in a source checkpoint, and the codec that reads them."""

    name: str  # logical name in the checkpoint, e.g. "layers.0.ffn.experts.3.w1.weight"
    codec: str  # registered codec name
    parts: Mapping[str, str]  # role -> stored tensor name, e.g. {"weight": ..., "scale": ...}
    shape: tuple[int, ...]  # logical (decoded) shape
    params: Mapping[str, Any] = field(default_factory=dict)  # codec parameters (block size, bits, ...)

    @property
    def rows(self) -> int:
        """Rows of the logical tensor flattened over every axis but the last."""
        n = 1
        for d in self.shape[:-1]:
            n *= d
        return n


class Codec(ABC):
    """One stored format: which parts it needs, how to decode them exactly, how to encode."""

    name: ClassVar[str]
    roles: ClassVar[tuple[str, ...]]  # part roles, e.g. ("weight", "scale")
    # Grouping asks codecs in ascending priority; the first to claim a tensor owns it.
    priority: ClassVar[int] = 50

    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        """Groups of this format among `tensors` (name -> TensorInfo); the format facts live here.

        Raise FmtconvError when parts are found but do not fit together (shape, dtype).
        """
        return []

    @abstractmethod
    def decode(
        self,
        parts: Mapping[str, np.ndarray],
        group: SourceGroup,
        *,
        compute_dtype: np.dtype,
        rows: tuple[int, int] | None = None,
    ) -> Exact:
        """Decode rows [start, stop) of the flattened logical tensor (all rows when None)."""

    def decode_to(
        self, parts: Mapping[str, np.ndarray], group: SourceGroup, *, dtype: np.dtype, rows: tuple[int, int] | None = None
    ) -> np.ndarray | None:
        """Optional fast path: rows already rounded to `dtype`, equal to `decode(...).to(dtype)`; None where it does not apply."""
        return None

    @abstractmethod
    def encode(self, values: Exact | np.ndarray, **params: Any) -> dict[str, np.ndarray]:
        """Encode values (last axis = input dim) into this format's stored parts, by role."""


def row_range(rows: tuple[int, int] | None, total: int, name: str | None = None) -> tuple[int, int]:
    """Validate `rows` against a tensor of `total` flattened rows; None means all rows."""
    from fmtconv.errors import FmtconvError

    if rows is None:
        return 0, total
    start, stop = int(rows[0]), int(rows[1])
    if not 0 <= start <= stop <= total:
        raise FmtconvError(f"rows {rows} outside the tensor's {total} rows", tensor=name)
    return start, stop


def values_of(values: "Exact | np.ndarray") -> np.ndarray:
    """The plain array behind an Exact or an array."""
    return values.values if isinstance(values, Exact) else np.asarray(values)
