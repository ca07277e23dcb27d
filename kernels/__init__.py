"""Compiled (numba) kernels for the hot routes, byte-identical to the NumPy references in kernels_ref.

Which implementation runs is chosen in routes.py and nowhere else (FMTCONV_KERNELS=auto|compiled|reference);
the bytes are the same either way (tests/test_kernels_compiled.py and tests/test_convert_kernel_paths.py).
"""

from fmtconv.kernels.routes import (
    AUTO_MIN_PARAMS,
    FP8_E8M0,
    FP8_FLOAT,
    KERNELS_ENV,
    MXFP4,
    TABLE_ROUTES,
    affine_quantize,
    affine_quantize_fp8,
    affine_quantize_mxfp4,
    auto_for,
    compiled,
    dense,
    pack_codes,
    warm_up,
)

__all__ = [
    "AUTO_MIN_PARAMS",
    "FP8_E8M0",
    "FP8_FLOAT",
    "KERNELS_ENV",
    "MXFP4",
    "TABLE_ROUTES",
    "affine_quantize",
    "affine_quantize_fp8",
    "affine_quantize_mxfp4",
    "auto_for",
    "compiled",
    "dense",
    "pack_codes",
    "warm_up",
]
