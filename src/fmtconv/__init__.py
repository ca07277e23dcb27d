"""fmtconv: convert quantized LLM checkpoints into MLX bundles, bit-exact.

Subpackages: `fmtconv.formats` (codecs and safetensors I/O), `fmtconv.kernels_ref`
(NumPy references of MLX's quantization kernels), `fmtconv.convert` (the converter).
"""

import os

# fmtconv runs its own worker threads.  A multi-threaded BLAS adds threads that spin while waiting for work and,
# on the small matrix products of the MXFP4 `mse` route, tripled its time on 2 cores.  Set only if unset, and only
# effective when NumPy is not loaded yet (the CLI, the bench's child processes).
for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ.setdefault(_var, "1")

from fmtconv.errors import FmtconvError  # noqa: E402

__version__ = "0.1.0"

__all__ = ["FmtconvError", "__version__"]
