"""`fmtconv bench kernels`: single-thread Mparam/s of each compiled kernel, next to its NumPy reference and mx.quantize.

One 2048 x 4096 matrix per route (bfloat16 compute dtype, group 64): dense bfloat16 -> 4/8-bit, MXFP4 -> 4-bit,
FP8 x E8M0 -> 8-bit, FP8 x float32 (mlx_lm rounding) -> 4-bit; best of a few runs each, after a warm-up
call, so JIT time is not counted.  The dense route is also timed with kernels_ref and with mx.quantize on MLX's
CPU backend (kernels_ref.bench keeps the 8192 x 8192 reference-vs-MLX figure).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from fmtconv import kernels_ref
from fmtconv.kernels_ref.table_driven import affine_quantize_mxfp4 as ref_mxfp4

from . import fp8, mxfp4
from . import affine as dense


def _best(fn: Callable[[], Any], repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_compiled_bench(rows: int = 2048, cols: int = 4096, repeat: int = 5) -> dict[str, Any]:
    """{route: Mparam/s} for the compiled kernels (both arithmetics) and the references they replace."""
    rng = np.random.default_rng(0)
    n = rows * cols
    bf16 = np.dtype(ml_dtypes.bfloat16)
    w = rng.standard_normal((rows, cols), dtype=np.float32).astype(bf16)
    packed = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
    e8 = rng.integers(118, 122, (rows, cols // 32), dtype=np.uint8)
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8) & np.uint8(0xBF)
    srows = np.arange(rows, dtype=np.int64) // 128
    s_e8m0 = rng.integers(117, 121, (rows // 128, cols // 128), dtype=np.uint8)
    s_f32 = (rng.random((rows // 128, cols // 128)) * 1e-3).astype(np.float32)
    out: dict[str, Any] = {"rows": rows, "cols": cols, "group_size": 64, "dtype": "bfloat16", "threads": 1}
    for be in ("cpu", "metal"):
        routes = {
            f"dense_bf16_to_4bit_{be}": lambda: dense.affine_quantize(w, 64, 4, backend=be),
            f"dense_bf16_to_8bit_{be}": lambda: dense.affine_quantize(w, 64, 8, backend=be),
            f"mxfp4_to_4bit_{be}": lambda: mxfp4.affine_quantize_mxfp4(packed, e8, 64, 4, dtype=bf16, backend=be),
            f"fp8_e8m0_to_8bit_{be}": lambda: fp8.affine_quantize_fp8(codes, s_e8m0, srows, 128, scale_kind="e8m0", group_size=64,
                                                                     bits=8, dtype=bf16, backend=be),
            f"fp8_f32_to_4bit_{be}": lambda: fp8.affine_quantize_fp8(codes, s_f32, srows, 128, scale_kind="float", group_size=64,
                                                                    bits=4, dtype=bf16, backend=be),
        }
        for name, fn in routes.items():
            out[f"compiled_{name}_mparam_s"] = round(n / _best(fn, repeat) / 1e6, 1)
        out[f"reference_dense_bf16_to_4bit_{be}_mparam_s"] = round(
            n / _best(lambda: kernels_ref.affine_quantize(w, 64, 4, backend=be), 2) / 1e6, 1)
        out[f"reference_mxfp4_to_4bit_{be}_mparam_s"] = round(
            n / _best(lambda: ref_mxfp4(packed, e8, 64, 4, dtype=bf16, backend=be), 2) / 1e6, 1)
    try:
        import mlx.core as mx
    except ImportError:
        return out
    mw = mx.array(w.view(np.uint16)).view(mx.bfloat16)
    mx.eval(mw)
    out["mlx_cpu_dense_bf16_to_4bit_mparam_s"] = round(
        n / _best(lambda: mx.eval(*mx.quantize(mw, 64, 4, stream=mx.cpu)), repeat) / 1e6, 1)
    return out
