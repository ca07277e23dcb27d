"""The switch between the compiled kernels and kernels_ref, and the warm-up that keeps JIT time out of the hot loop.

FMTCONV_KERNELS=auto (default): the compiled kernels, except that a conversion smaller than AUTO_MIN_PARAMS
tells `auto_for` so and then runs the references (numba's ~1.5 s start per process would cost more than
the kernels save); compiled: always (an error without numba); reference: never.  Bytes are the same.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable

import ml_dtypes
import numpy as np

from fmtconv import kernels_ref
from fmtconv.errors import FmtconvError
from fmtconv.kernels_ref import packing, table_driven

from ._jit import numba_available

KERNELS_ENV = "FMTCONV_KERNELS"  # "auto" (default), "compiled" or "reference"
# Below this many parameters a conversion is done by the references before numba has even started
# (reference ~200 Mparam/s, compiled ~800, numba's start ~1.5 s: break-even near 400 M).
AUTO_MIN_PARAMS = 1 << 28
_warm_lock = threading.Lock()
_warm: set[str] = set()  # kernels compiled or loaded in this process
_auto = True  # what "auto" means now; auto_for() sets it


def compiled() -> bool:
    """Whether the compiled kernels run now (FMTCONV_KERNELS, numba's presence, and auto_for's verdict)."""
    choice = os.environ.get(KERNELS_ENV, "auto").strip().lower()
    if choice == "reference":
        return False
    if choice == "compiled":
        if not numba_available():
            raise FmtconvError(f"{KERNELS_ENV}=compiled, but numba is not installed")
        return True
    if choice == "auto":
        return _auto and numba_available()
    raise FmtconvError(f"{KERNELS_ENV} must be 'auto', 'compiled' or 'reference', got {choice!r}")


def auto_for(params: int) -> None:
    """Tell "auto" how big the coming work is: the compiled kernels only from AUTO_MIN_PARAMS parameters."""
    global _auto
    _auto = params >= AUTO_MIN_PARAMS


def affine_quantize(w: np.ndarray, group_size: int = 64, bits: int = 4, *, backend: str = "metal", name: str | None = None):
    """kernels_ref.affine_quantize's contract and bytes: (wq uint32, scales, biases in w's dtype)."""
    if not compiled():
        return kernels_ref.affine_quantize(w, group_size, bits, backend=backend, name=name)
    from .affine import affine_quantize as fast

    return fast(w, group_size, bits, backend=backend, name=name)


def affine_quantize_mxfp4(packed: np.ndarray, scale_codes: np.ndarray, group_size: int = 64, bits: int = 4, *,
                          dtype: np.dtype, backend: str = "metal"):
    """kernels_ref.table_driven.affine_quantize_mxfp4's contract and bytes (None: take the float path)."""
    if not compiled():
        return table_driven.affine_quantize_mxfp4(packed, scale_codes, group_size, bits, dtype=dtype, backend=backend)
    from .mxfp4 import affine_quantize_mxfp4 as fast

    return fast(packed, scale_codes, group_size, bits, dtype=dtype, backend=backend)


def affine_quantize_fp8(codes: np.ndarray, scale: np.ndarray, srows: np.ndarray, block_cols: int, *, scale_kind: str,
                        group_size: int, bits: int, dtype: np.dtype, backend: str):
    """FP8 rows straight to affine (fmtconv.kernels.fp8); None where the caller must take the NumPy route
    (always with the reference kernels: that route is the reference)."""
    if not compiled():
        return None
    from .fp8 import affine_quantize_fp8 as fast

    return fast(codes, scale, srows, block_cols, scale_kind=scale_kind, group_size=group_size,
                bits=bits, dtype=dtype, backend=backend)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """kernels_ref.packing.pack_codes's contract and bytes."""
    if not compiled():
        return packing.pack_codes(codes, bits)
    from .packing import pack_codes as fast

    return fast(codes, bits)


# The compiled kernels by the route that calls them: what warm_up compiles, or loads from numba's cache.
MXFP4 = "mxfp4"  # MXFP4 codes -> affine (one specialization for every compute dtype: the tables are float32)
FP8_E8M0 = "fp8_e8m0"  # FP8 x E8M0 block scales -> affine
FP8_FLOAT = "fp8_float"  # FP8 x float block scales (mlx-lm rounding) -> affine
PACK = "pack"  # uint32 packing of codes
TABLE_ROUTES = (MXFP4, FP8_E8M0, FP8_FLOAT)  # the kernels that read codes, not decoded floats


def dense(dtype: np.dtype | str) -> str:
    """The key of the dense rows -> affine kernel for inputs of `dtype` (bfloat16, float16 or float32)."""
    return f"dense:{np.dtype(dtype).name}"


_BF16 = np.dtype(ml_dtypes.bfloat16)
KEYS = (MXFP4, FP8_E8M0, FP8_FLOAT, PACK, *(dense(d) for d in (_BF16, np.float16, np.float32)))


def _warm_one(key: str) -> None:
    """One tiny call of the kernel `key` names, with the argument types real calls have."""
    srows = np.zeros(1, dtype=np.int64)
    if key.startswith("dense:"):
        affine_quantize(np.zeros((1, 32), dtype=np.dtype(key.split(":", 1)[1])), 32, 4, backend="cpu")
    elif key == MXFP4:
        affine_quantize_mxfp4(np.zeros((1, 16), np.uint8), np.full((1, 1), 127, np.uint8), 32, 4, dtype=_BF16, backend="cpu")
    elif key in (FP8_E8M0, FP8_FLOAT):
        scale = np.full((1, 1), 127, np.uint8) if key == FP8_E8M0 else np.ones((1, 1), np.float32)
        affine_quantize_fp8(np.zeros((1, 32), np.uint8), scale, srows, 128, scale_kind="e8m0" if key == FP8_E8M0 else "float",
                            group_size=32, bits=4, dtype=_BF16, backend="cpu")
    elif key == PACK:
        pack_codes(np.zeros((1, 32), np.uint8), 4)
    else:
        raise ValueError(f"unknown kernel {key!r}; expected one of {KEYS}")


def warm_up(keys: Iterable[str] | None = None) -> dict[str, dict[str, float | bool]]:
    """Compile (or load from numba's on-disk cache) the kernels `keys` names (every kernel when None), on tiny inputs,
    before worker threads start: a conversion compiles only what its routes call (a kernel not named here still
    compiles on its first call).  Returns, per kernel warmed now, its seconds and whether numba had to compile it."""
    done: dict[str, dict[str, float | bool]] = {}
    if not compiled():
        return done
    with _warm_lock:
        for key in KEYS if keys is None else sorted(keys):
            if key not in _warm:
                misses, t0 = _cache_misses(), time.perf_counter()
                _warm_one(key)
                done[key] = {"seconds": round(time.perf_counter() - t0, 3), "compiled": _cache_misses() > misses}
                _warm.add(key)
    return done


def _cache_misses() -> int:
    """How many signatures numba compiled (found no cached machine code for) so far, over this package's kernels."""
    from . import affine, fp8, mxfp4, packing

    n = 0
    for mod in (affine, fp8, mxfp4, packing):
        for obj in vars(mod).values():
            misses = getattr(getattr(obj, "stats", None), "cache_misses", None)
            if misses is not None:
                n += sum(misses.values())
    return n
