"""The two float32 -> integral rounding rules MLX's quantization kernels use."""

from __future__ import annotations

import numpy as np


def round_half_even(x: np.ndarray) -> np.ndarray:
    """C `std::rint` in the default rounding mode (MLX CPU kernels, and `mx.round`): ties to even."""
    return np.rint(x)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Metal/CUDA `round`: ties away from zero.  Exact for every float32 (no `x + 0.5` rounding)."""
    r = np.rint(x)
    t = np.trunc(x)
    # A tie is exactly where x - trunc(x) == +-0.5 (exact in float); rint then went to even.
    tie = np.abs(x - t) == np.float32(0.5)
    return np.where(tie, t + np.copysign(np.float32(1.0), x), r).astype(x.dtype, copy=False)
