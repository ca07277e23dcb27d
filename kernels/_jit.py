"""The one place numba is imported: the decorator every compiled kernel uses, and whether numba is there.

`jit` compiles in nopython mode, releases the GIL (the pipeline's worker threads run kernels side by
side) and caches the machine code on disk (`cache=True`: next to the sources, or in the user cache
directory when that is read-only), so only the first run on a machine pays the compile (~12 s for all
kernels; loading them from the cache takes ~1.5 s per process, most of it numba's own start).
No `fastmath`, so LLVM keeps IEEE float32 semantics (no reassociation, no FTZ, correctly rounded
division), which the byte-identity with kernels_ref depends on; `error_model="numpy"`, so a float
division by zero gives inf/NaN as in NumPy instead of raising.
numba's cache is keyed on each kernel's own source file: after editing affine_math.py or packing.py in
a checkout, delete kernels/__pycache__/*.nb[ci] (pip installs give every file a fresh stamp).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np


@functools.lru_cache(maxsize=None)
def numba_available() -> bool:
    """Whether numba can be imported (checked without importing it)."""
    return importlib.util.find_spec("numba") is not None


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """numba.njit(cache=True, nogil=True, error_model="numpy")."""
    import numba

    return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


def inline(fn: Callable[..., Any]) -> Callable[..., Any]:
    """jit for the small helpers the row kernels call per group or per element: inlined into them at numba's IR
    level (they live in other modules, where LLVM would keep them as calls)."""
    import numba

    return numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")(fn)


def readonly(a: Any) -> np.ndarray:
    """A C-contiguous read-only view.  Sources are read-only mmaps; passing every input array read-only
    means each kernel has one compiled specialization (numba types read-only arrays separately)."""
    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v
