"""fmtconv.formats: one codec per stored format, the exact intermediate, grouping of stored parts.

    from fmtconv.formats import get_codec
    codec = get_codec("mxfp4")
    exact = codec.decode(parts, group, compute_dtype=np.dtype("bfloat16"))
"""

from fmtconv.formats.base import Codec, Exact, SourceGroup
from fmtconv.formats.registry import codec_classes, codec_names, get_codec, register_codec

# Importing the codec modules registers them.
from fmtconv.formats import dense, fp8_block, mlx_affine, mlx_fp, mxfp4, nvfp4  # noqa: E402,F401
from fmtconv.formats.grouping import find_groups  # noqa: E402

__all__ = ["Codec", "Exact", "SourceGroup", "codec_classes", "codec_names", "get_codec", "register_codec", "find_groups"]
