"""NumPy references of MLX's quantization kernels, bit-exact (arithmetic in affine.py / fp.py docstrings)."""

from .affine import affine_dequantize, affine_quantize
from .fp import FP_MODES, fp_dequantize, fp_quantize
from .tables import (
    E2M1_MAX,
    E2M1_VALUES,
    E4M3_MAX,
    e2m1_decode,
    e2m1_encode,
    e4m3_decode,
    e4m3_encode,
    e8m0_decode,
    e8m0_encode,
    pack_fp4,
    unpack_fp4,
)

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "E4M3_MAX",
    "FP_MODES",
    "affine_dequantize",
    "affine_quantize",
    "e2m1_decode",
    "e2m1_encode",
    "e4m3_decode",
    "e4m3_encode",
    "e8m0_decode",
    "e8m0_encode",
    "fp_dequantize",
    "fp_quantize",
    "pack_fp4",
    "unpack_fp4",
]
