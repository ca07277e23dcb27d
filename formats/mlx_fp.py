"""MLX's microscaling modes as stored by mlx_lm: `X.weight` uint32, `X.scales` uint8 codes, no biases.

mxfp4: E2M1 x8 per word, E8M0 per 32; mxfp8: E4M3 x4 per word, E8M0 per 32; nvfp4: E2M1, E4M3
per 16, optional `X.global_scale` float32 (MLX's amax convention: dequantize multiplies by
global_scale / (6*448); mlx_lm/models/muse_spark.py `sanitize` converts ModelOpt's
weight_scale_2 with * 6 * 448).  Mode, group and bits: mlx/ops.cpp `fp_quantize`; mlx_lm
utils.py `infer_quant_config` tells them apart by scale count, as `recognise` does here.
Arithmetic: kernels_ref/fp.py (`fp_quantize`, `fp_dequantize`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec, Exact, SourceGroup, row_range, values_of
from fmtconv.formats.mlx_affine import module_quantization
from fmtconv.formats.parts import info_shape, prod, refuse_e8m0_nan, refuse_nonfinite, stem
from fmtconv.formats.registry import register_codec
from fmtconv.formats.rounding import COMPUTE_DTYPES, round_to_dtype, to_float32_odd
from fmtconv.kernels_ref import E2M1_MAX, E4M3_MAX, e2m1_encode, e4m3_decode, e4m3_encode, pack_fp4
from fmtconv.kernels_ref.fp import FP_MODES, fp_dequantize, fp_quantize


class MlxFpCodec(Codec):
    """One of MLX's mxfp4 / mxfp8 / nvfp4 modes (subclasses fix `mode`)."""

    mode: ClassVar[str]
    roles: ClassVar[tuple[str, ...]] = ("weight", "scales")
    priority: ClassVar[int] = 30

    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        group_size, bits = FP_MODES[cls.mode]
        groups = []
        for name, info in tensors.items():
            base = stem(name, ".weight")
            if base is None or info.dtype != "U32" or f"{base}.scales" not in tensors or f"{base}.biases" in tensors:
                continue
            s = tensors[f"{base}.scales"]
            wshape, sshape = info_shape(info), info_shape(s)
            k = wshape[-1] * 32 // bits
            q = module_quantization(config, base)
            if q is not None and q.get("mode") not in (None, cls.mode):
                continue
            if s.dtype != "U8" or sshape != wshape[:-1] + (k // group_size,):
                continue  # another mode's scale count; an unmatched pair is reported as an orphan
            parts = {"weight": name, "scales": s.name}
            if cls.mode == "nvfp4" and f"{base}.global_scale" in tensors:
                parts["global_scale"] = f"{base}.global_scale"
            groups.append(SourceGroup(name, cls.name, parts, wshape[:-1] + (k,), {"mode": cls.mode}))
        return groups

    def decode(self, parts, group, *, compute_dtype, rows=None) -> Exact:
        group_size, bits = FP_MODES[self.mode]
        for role in self.roles:
            if role not in parts:
                raise FmtconvError(f"MLX {self.mode}: missing the {role} part", tensor=group.parts.get(role, group.name))
        k, total = group.shape[-1], group.rows
        w, s = np.asarray(parts["weight"]), np.asarray(parts["scales"])
        if w.dtype != np.uint32 or w.size != total * k * bits // 32:
            raise FmtconvError(f"MLX {self.mode} weight: expected uint32 with {total * k * bits // 32} words, got {w.dtype} {w.shape}", tensor=group.parts.get("weight"))
        if s.dtype != np.uint8 or s.size != total * k // group_size:
            raise FmtconvError(f"MLX {self.mode} scales: expected uint8 with {total * k // group_size} codes, got {s.dtype} {s.shape}", tensor=group.parts.get("scales"))
        start, stop = row_range(rows, total, group.name)
        s2 = s.reshape(total, -1)[start:stop]
        if group_size == 32:
            refuse_e8m0_nan(s2, name=group.parts.get("scales"))
        else:
            refuse_nonfinite(e4m3_decode(s2), name=group.parts.get("scales"), what="E4M3 scale (0x7F/0xFF are NaN)")
        g = self._global(parts, group)
        out = fp_dequantize(
            w.reshape(total, -1)[start:stop], s2, self.mode, dtype=np.float32, global_scale=g,
            backend=group.params.get("backend", "cpu"), name=group.name,
        )
        return Exact(out, np.dtype(compute_dtype), self.name, dict(group.params))

    @staticmethod
    def _global(parts: Mapping[str, np.ndarray], group: SourceGroup) -> float | None:
        if "global_scale" not in parts:
            return None
        g = np.asarray(parts["global_scale"]).reshape(-1)
        if g.size != 1 or not np.isfinite(g[0]):
            raise FmtconvError(f"MLX nvfp4 global_scale: expected one finite value, got {g}", tensor=group.parts.get("global_scale"))
        return float(g[0])

    def encode(
        self,
        values: Exact | np.ndarray,
        *,
        backend: str = "metal",
        dtype: np.dtype | None = None,
        scales: np.ndarray | None = None,
        global_scale: float | None = None,
        **_: Any,
    ) -> dict[str, np.ndarray]:
        """`{"weight": uint32, "scales": uint8[, "global_scale"]}` as `mx.quantize(mode=...)` writes them
        (values rounded once to the compute dtype first); with `scales`, codes against those scales."""
        group_size, bits = FP_MODES[self.mode]
        v = values_of(values)
        extra = {} if global_scale is None else {"global_scale": np.array(global_scale, dtype=np.float32)}
        if scales is None:
            dt = np.dtype(dtype) if dtype is not None else (values.compute_dtype if isinstance(values, Exact) else np.asarray(v).dtype)
            if dt not in COMPUTE_DTYPES:
                raise FmtconvError(f"MLX {self.mode} encode needs a compute dtype (bfloat16/float16/float32), got {dt}")
            wq, sc = fp_quantize(round_to_dtype(v, dt), self.mode, global_scale=global_scale, backend=backend)
            return {"weight": wq, "scales": sc, **extra}
        x = np.asarray(v, dtype=np.float64)
        lead, k = x.shape[:-1], x.shape[-1]
        codes_s = np.ascontiguousarray(np.asarray(scales)).view(np.uint8).reshape(prod(lead), k // group_size)
        if group_size == 32:
            unit = np.ldexp(1.0, codes_s.astype(np.int64) - 127)
        else:
            unit = e4m3_decode(codes_s).astype(np.float64)
            if global_scale is not None:
                unit = unit * float(np.float32(global_scale) / np.float32(E4M3_MAX * E2M1_MAX))
        with np.errstate(divide="ignore", invalid="ignore"):
            y = np.where(unit[..., None] == 0, 0.0, x.reshape(codes_s.shape + (group_size,)) / unit[..., None])
        y = to_float32_odd(y).reshape(lead + (k,))
        packed = e4m3_encode(y) if bits == 8 else pack_fp4(e2m1_encode(y))
        wq = np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)
        return {"weight": wq, "scales": codes_s.reshape(lead + (k // group_size,)), **extra}


@register_codec
class MlxMxfp4Codec(MlxFpCodec):
    name: ClassVar[str] = "mlx_mxfp4"
    mode: ClassVar[str] = "mxfp4"


@register_codec
class MlxMxfp8Codec(MlxFpCodec):
    name: ClassVar[str] = "mlx_mxfp8"
    mode: ClassVar[str] = "mxfp8"


@register_codec
class MlxNvfp4Codec(MlxFpCodec):
    name: ClassVar[str] = "mlx_nvfp4"
    mode: ClassVar[str] = "nvfp4"
    roles: ClassVar[tuple[str, ...]] = ("weight", "scales")  # plus optional "global_scale"
