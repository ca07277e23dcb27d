"""The one place numba is imported: the decorator every compiled kernel uses, and whether it is there.

`jit` compiles in nopython mode, releases the GIL (the pipeline's worker threads run kernels side by
side) and caches the machine code on disk (`cache=True`), so only the first run on a machine pays
the compile.  No `fastmath`, so LLVM keeps IEEE float32 semantics (no reassociation, no FTZ, correctly
rounded division), which the byte-identity with kernels_ref depends on; `error_model="numpy"`, so a
float division by zero gives inf/NaN as in NumPy instead of raising.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the NumPy reference usable without it
    numba = None
    HAVE_NUMBA = False


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """numba.njit(cache=True, nogil=True, error_model="numpy"), or the plain Python function when numba is missing."""
    if not HAVE_NUMBA:
        return fn
    return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


def readonly(a: Any) -> Any:
    """A C-contiguous read-only view.  Sources are read-only mmaps; passing every input array read-only
    means each kernel has one compiled specialization (numba types read-only arrays separately)."""
    import numpy as np

    v = np.ascontiguousarray(a).view()
    v.flags.writeable = False
    return v
