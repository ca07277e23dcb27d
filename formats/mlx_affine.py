"""MLX affine quantization: `X.weight` uint32 codes, `X.scales`, `X.biases` in the compute dtype.

Value = code * scale + bias per group of `group_size` inputs; bits in {2,3,4,5,6,8}, group in
{32,64,128}.  Bits and group size come from config.json `quantization` (per-module entries
keyed by module path override the global ones), as mlx_lm/utils.py `load_model` reads them.
The arithmetic (packing, quantize, dequantize on each backend) lives in kernels_ref/affine.py;
this codec only wires parts to it.  Decoded values are MLX's dequantized values (in the
scales' dtype, held exactly in float32) for the chosen backend (default "cpu", what
`mx.dequantize` computes on a CPU stream; "metal" models the GPU's fused multiply-add).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec, Exact, SourceGroup, row_range, values_of
from fmtconv.formats.parts import info_shape, prod, stem
from fmtconv.formats.registry import register_codec
from fmtconv.formats.rounding import COMPUTE_DTYPES, round_to_dtype
from fmtconv.kernels_ref.affine import SUPPORTED_GROUP_SIZES, affine_dequantize, affine_quantize
from fmtconv.kernels_ref.packing import SUPPORTED_BITS, pack_codes, unpack_codes

_FLOAT_DTYPES = ("BF16", "F16", "F32")


def module_quantization(config: Mapping[str, Any], module: str) -> Mapping[str, Any] | None:
    """The `quantization` entry that applies to `module` (mlx_lm convention), or None."""
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, Mapping):
        return None
    per = q.get(module)
    if isinstance(per, Mapping):
        return per
    if per is False:
        return None
    return q if "bits" in q or "group_size" in q or "mode" in q else None


@register_codec
class MlxAffineCodec(Codec):
    """MLX affine (`mx.quantize(w, group_size, bits)`), encode/decode through kernels_ref."""

    name: ClassVar[str] = "mlx_affine"
    roles: ClassVar[tuple[str, ...]] = ("weight", "scales", "biases")
    priority: ClassVar[int] = 30

    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        groups = []
        for name, info in tensors.items():
            base = stem(name, ".weight")
            if base is None or info.dtype != "U32" or f"{base}.scales" not in tensors or f"{base}.biases" not in tensors:
                continue
            s, b = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
            q = module_quantization(config, base)
            if q is None or q.get("mode", "affine") != "affine":
                raise FmtconvError(
                    "MLX affine weight: config.json `quantization` gives no bits/group_size for this module", tensor=name
                )
            bits, gs = int(q.get("bits", 4)), int(q.get("group_size", 64))
            wshape, sshape = info_shape(info), info_shape(s)
            k = wshape[-1] * 32 // bits
            if s.dtype not in _FLOAT_DTYPES or b.dtype != s.dtype or info_shape(b) != sshape or sshape != wshape[:-1] + (k // gs,):
                raise FmtconvError(
                    f"MLX affine scales/biases: expected {'/'.join(_FLOAT_DTYPES)} {wshape[:-1] + (k // gs,)} "
                    f"for weight {wshape} at {bits} bits, group {gs}; got {s.dtype} {sshape} / {b.dtype} {info_shape(b)}",
                    tensor=s.name,
                )
            parts = {"weight": name, "scales": s.name, "biases": b.name}
            groups.append(SourceGroup(name, cls.name, parts, wshape[:-1] + (k,), {"bits": bits, "group_size": gs}))
        return groups

    def decode(self, parts, group, *, compute_dtype, rows=None) -> Exact:
        bits, gs = int(group.params.get("bits", 4)), int(group.params.get("group_size", 64))
        backend = group.params.get("backend", "cpu")
        for role in self.roles:
            if role not in parts:
                raise FmtconvError(f"MLX affine: missing the {role} part", tensor=group.parts.get(role, group.name))
        k, total = group.shape[-1], group.rows
        w = np.asarray(parts["weight"])
        if w.dtype != np.uint32 or w.size != total * k * bits // 32:
            raise FmtconvError(f"MLX affine weight: expected uint32 with {total * k * bits // 32} words, got {w.dtype} {w.shape}", tensor=group.parts.get("weight"))
        s, b = np.asarray(parts["scales"]), np.asarray(parts["biases"])
        for arr, role in ((s, "scales"), (b, "biases")):
            if arr.size != total * k // gs:
                raise FmtconvError(f"MLX affine {role}: expected {total * k // gs} values ({group.shape} / group {gs}), got {arr.shape}", tensor=group.parts.get(role))
        start, stop = row_range(rows, total, group.name)
        w2, s2, b2 = (a.reshape(total, -1)[start:stop] for a in (w, s, b))
        out = affine_dequantize(w2, s2, b2, gs, bits, backend=backend, name=group.name)
        factored = {"codes": unpack_codes(w2, bits), "scales": s2, "biases": b2}
        return Exact(out.astype(np.float32), np.dtype(compute_dtype), self.name, dict(group.params), factored)

    def encode(
        self,
        values: Exact | np.ndarray,
        *,
        bits: int = 4,
        group_size: int = 64,
        backend: str = "metal",
        dtype: np.dtype | None = None,
        scales: np.ndarray | None = None,
        biases: np.ndarray | None = None,
        **_: Any,
    ) -> dict[str, np.ndarray]:
        """`{"weight", "scales", "biases"}` as `mx.quantize` on `backend` writes them, from the values
        rounded once to the compute dtype (`dtype`, else the Exact's compute dtype).  With
        `scales`/`biases` given, each code is the one whose value lies nearest (exactly computed);
        an Exact decoded from this codec with those same scales gives back its own codes."""
        if bits not in SUPPORTED_BITS or group_size not in SUPPORTED_GROUP_SIZES:
            raise FmtconvError(f"MLX affine supports bits {SUPPORTED_BITS} and group sizes {SUPPORTED_GROUP_SIZES}, got {bits}, {group_size}")
        v = values_of(values)
        dt = np.dtype(dtype) if dtype is not None else (values.compute_dtype if isinstance(values, Exact) else np.asarray(v).dtype)
        if dt not in COMPUTE_DTYPES:
            raise FmtconvError(f"MLX affine encode needs a compute dtype (bfloat16/float16/float32), got {dt}")
        if scales is None:
            return dict(zip(self.roles, affine_quantize(round_to_dtype(v, dt), group_size, bits, backend=backend)))
        x = np.asarray(v, dtype=np.float64)
        lead, k = x.shape[:-1], x.shape[-1]
        f = values.factored if isinstance(values, Exact) and values.codec == self.name else None
        if f is not None and f["codes"].size == x.size and all(
            np.asarray(a).tobytes() == np.asarray(f[r]).tobytes() for r, a in (("scales", scales), ("biases", biases))
        ):
            # Same scales as decoded from: the source's codes (values alone may not tell them apart).
            return {"weight": pack_codes(f["codes"].reshape(lead + (k,)), bits), "scales": np.asarray(scales), "biases": np.asarray(biases)}
        s = np.asarray(scales).astype(np.float64).reshape(prod(lead), k // group_size, 1)
        bb = np.asarray(biases).astype(np.float64).reshape(s.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s == 0, 0.0, np.rint((x.reshape(s.shape[0], -1, group_size) - bb) / s))
        codes = np.clip(q, 0, (1 << bits) - 1).astype(np.uint8).reshape(lead + (k,))
        return {"weight": pack_codes(codes, bits), "scales": np.asarray(scales), "biases": np.asarray(biases)}
