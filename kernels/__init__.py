"""Compiled (numba) kernels for the hot routes, byte-identical to the NumPy references in kernels_ref.

Which implementation runs is chosen here and nowhere else: the compiled kernels when numba imports,
the references when it does not or when FMTCONV_KERNELS=reference is set (the bytes are the same
either way; tests/test_kernels_compiled.py and tests/test_convert_kernel_paths.py check that).
"""

from fmtconv.kernels.routes import (
    KERNELS_ENV,
    affine_quantize,
    affine_quantize_fp8,
    affine_quantize_mxfp4,
    compiled,
    pack_codes,
    warm_up,
)

__all__ = [
    "KERNELS_ENV",
    "affine_quantize",
    "affine_quantize_fp8",
    "affine_quantize_mxfp4",
    "compiled",
    "pack_codes",
    "warm_up",
]
