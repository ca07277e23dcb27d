"""Throughput of the NumPy affine reference next to `mx.quantize` (MLX CPU), one thread.

One thread: OMP/OPENBLAS/MKL/VECLIB thread variables are set to 1 before NumPy/MLX load
when run as a script; NumPy's elementwise ops are single-threaded anyway, and MLX's CPU
`quantize` kernel is a plain serial loop (mlx/backend/cpu/quantized.cpp `quantize`).
Usage: python -m fmtconv.kernels_ref.bench  (or `fmtconv bench kernels`).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from .affine import affine_quantize  # noqa: E402


def _best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_kernel_bench(rows: int = 8192, cols: int = 8192, bits: int = 4, group_size: int = 64, repeat: int = 2) -> dict:
    """Mparam/s of affine_quantize (metal, cpu backends) and mx.quantize on one bf16 matrix."""
    n = rows * cols
    w = np.random.default_rng(0).standard_normal((rows, cols), dtype=np.float32).astype(ml_dtypes.bfloat16)
    result: dict = {"rows": rows, "cols": cols, "bits": bits, "group_size": group_size, "dtype": "bfloat16"}
    for backend in ("metal", "cpu"):
        t = _best_of(lambda: affine_quantize(w, group_size, bits, backend=backend), repeat)
        result[f"numpy_{backend}_mparam_s"] = n / t / 1e6
    try:
        import mlx.core as mx
    except ImportError:
        result["mlx_cpu_mparam_s"] = None
        return result
    mw = mx.array(w.view(np.uint16)).view(mx.bfloat16)
    mx.eval(mw)

    def run_mlx():
        mx.eval(*mx.quantize(mw, group_size, bits, stream=mx.cpu))

    t = _best_of(run_mlx, repeat)
    result["mlx_cpu_mparam_s"] = n / t / 1e6
    for backend in ("metal", "cpu"):
        result[f"ratio_{backend}_vs_mlx"] = result[f"numpy_{backend}_mparam_s"] / result["mlx_cpu_mparam_s"]
    return result


if __name__ == "__main__":
    for key, value in run_kernel_bench().items():
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
