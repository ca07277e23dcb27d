"""Helpers the codecs share for reading stored parts: byte views, shape checks, name lookups."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fmtconv.errors import FmtconvError


def prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def byte_rows(arr: np.ndarray, rows: int, row_bytes: int, *, name: str | None, what: str) -> np.ndarray:
    """A packed part (any 1-byte dtype or uint32 words, any shape) as uint8 (rows, row_bytes), zero-copy."""
    a = np.asarray(arr)
    if a.dtype.itemsize not in (1, 4):
        raise FmtconvError(f"{what}: expected 8-bit or uint32 storage, got {a.dtype}", tensor=name)
    b = np.ascontiguousarray(a).view(np.uint8)
    if b.size != rows * row_bytes:
        raise FmtconvError(
            f"{what}: expected {rows * row_bytes} bytes ({rows} rows x {row_bytes}), got {b.size} (shape {a.shape}, {a.dtype})",
            tensor=name,
        )
    return b.reshape(rows, row_bytes)


def expect_shape(arr: np.ndarray, shape: tuple[int, ...], *, name: str | None, what: str) -> None:
    """Refuse a part whose shape differs (flat 1-D byte buffers of the right size are accepted by byte_rows)."""
    a = np.asarray(arr)
    if a.ndim > 1 and tuple(a.shape) != tuple(shape):
        raise FmtconvError(f"{what}: expected shape {tuple(shape)}, got {tuple(a.shape)}", tensor=name)


def refuse_e8m0_nan(codes: np.ndarray, *, name: str | None) -> None:
    """E8M0 code 255 is NaN (OCP MX v1.0 sec. 5.4.1); MLX would read it as +inf. fmtconv refuses it."""
    flat = np.asarray(codes).reshape(-1).view(np.uint8)
    if not flat.size or flat.max() != 255:  # one vectorised pass; the index is only needed for the message
        return
    bad = np.flatnonzero(flat == 255)
    if bad.size:
        raise FmtconvError(
            f"E8M0 scale code 255 (NaN) at flat index {int(bad[0])} ({bad.size} in all); expected codes 0..254",
            tensor=name,
        )


def refuse_nonfinite(values: np.ndarray, *, name: str | None, what: str) -> None:
    v = np.asarray(values)
    bad = np.flatnonzero(~np.isfinite(v.reshape(-1)))
    if bad.size:
        raise FmtconvError(f"{what}: non-finite value {v.reshape(-1)[bad[0]]} at flat index {int(bad[0])}; expected finite", tensor=name)


def check_overflow(values: np.ndarray, *, name: str | None, dtype: str = "float32") -> None:
    """Products of finite codes and scales that overflow the intermediate are refused, not written as inf."""
    if not np.isfinite(values).all():
        raise FmtconvError(f"decoded values overflow {dtype}; the scales are out of range", tensor=name)


def stem(name: str, suffix: str) -> str | None:
    """`name` without `suffix`, or None when it does not end with it."""
    return name[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else None


def quantization_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint's quantization_config (config.json, or hf_quant_config.json merged in by the caller)."""
    qc = config.get("quantization_config") or {}
    return qc if isinstance(qc, Mapping) else {}


def info_shape(info: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in info.shape)
