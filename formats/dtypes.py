"""Safetensors dtype strings and the NumPy / ml_dtypes types they map to.

Dtype names and sizes follow the safetensors format spec (huggingface/safetensors,
`safetensors/src/tensor.rs`, enum `Dtype`), including the F8_E8M0 and F4 additions.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class StoredDtype:
    """One safetensors dtype: its name, element size in bits and NumPy view type."""

    name: str
    bits: int
    numpy: np.dtype

    @property
    def packed(self) -> bool:
        """Sub-byte dtypes are stored packed; NumPy sees their raw bytes as uint8."""
        return self.bits < 8

    def nbytes(self, shape: tuple[int, ...]) -> int | None:
        """Byte length of a tensor of this dtype and shape; None when the bits do not fill whole bytes."""
        count = 1
        for d in shape:
            count *= d
        total_bits = count * self.bits
        if total_bits % 8:
            return None
        return total_bits // 8


_TABLE = [
    StoredDtype("BOOL", 8, np.dtype(np.bool_)),
    StoredDtype("U8", 8, np.dtype(np.uint8)),
    StoredDtype("I8", 8, np.dtype(np.int8)),
    StoredDtype("U16", 16, np.dtype(np.uint16)),
    StoredDtype("I16", 16, np.dtype(np.int16)),
    StoredDtype("U32", 32, np.dtype(np.uint32)),
    StoredDtype("I32", 32, np.dtype(np.int32)),
    StoredDtype("U64", 64, np.dtype(np.uint64)),
    StoredDtype("I64", 64, np.dtype(np.int64)),
    StoredDtype("F16", 16, np.dtype(np.float16)),
    StoredDtype("BF16", 16, np.dtype(ml_dtypes.bfloat16)),
    StoredDtype("F32", 32, np.dtype(np.float32)),
    StoredDtype("F64", 64, np.dtype(np.float64)),
    StoredDtype("F8_E4M3", 8, np.dtype(ml_dtypes.float8_e4m3fn)),
    StoredDtype("F8_E5M2", 8, np.dtype(ml_dtypes.float8_e5m2)),
    StoredDtype("F8_E8M0", 8, np.dtype(ml_dtypes.float8_e8m0fnu)),
    # Sub-byte floats: two (or four thirds) elements per byte, returned as raw uint8.
    StoredDtype("F4", 4, np.dtype(np.uint8)),
    StoredDtype("F6_E2M3", 6, np.dtype(np.uint8)),
    StoredDtype("F6_E3M2", 6, np.dtype(np.uint8)),
]

BY_NAME: dict[str, StoredDtype] = {d.name: d for d in _TABLE}
_BY_NUMPY: dict[np.dtype, StoredDtype] = {d.numpy: d for d in _TABLE if not d.packed}


def stored_dtype(name: str) -> StoredDtype | None:
    """The dtype for a safetensors dtype string, or None if unknown."""
    return BY_NAME.get(name)


def dtype_name_for(array_dtype: np.dtype) -> str:
    """The safetensors dtype string for a NumPy (or ml_dtypes) dtype."""
    d = _BY_NUMPY.get(np.dtype(array_dtype))
    if d is None:
        raise TypeError(f"no safetensors dtype for NumPy dtype {array_dtype}")
    return d.name
