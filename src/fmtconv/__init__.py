"""fmtconv: convert quantized LLM checkpoints into MLX bundles, bit-exact.

Subpackages: `fmtconv.formats` (codecs and safetensors I/O), `fmtconv.kernels_ref`
(NumPy references of MLX's quantization kernels), `fmtconv.convert` (the converter).
"""

from fmtconv.errors import FmtconvError

__version__ = "0.1.0"

__all__ = ["FmtconvError", "__version__"]
