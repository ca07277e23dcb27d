"""NVFP4: E2M1 elements two per byte (low nibble first), an E4M3 scale per 16 inputs, a float32 global scale.

Layouts:
  - ModelOpt ("modelopt"): `X.weight` U8 (out, in/2), `X.weight_scale` F8_E4M3 (out, in/16),
    `X.weight_scale_2` F32 scalar = amax / (6 * 448); value = e2m1 * e4m3 * weight_scale_2
    (MULTIPLY).  `X.input_scale` (activations) is claimed and ignored.  Stacked experts
    (Step-3.7-Flash NVFP4: `moe.gate_proj.weight` U8 [E, out, in/2]) carry one global scale per
    expert, `weight_scale_2` F32 [E] (../shared/releases/README.md): a global scale may have the
    weight's leading dimensions, one value per leading index.
    Source: vLLM model_executor/layers/quantization/modelopt.py `ModelOptNvFp4LinearMethod`
    `process_weights_after_loading` (alpha = input_scale * weight_scale_2, the GEMM multiplies);
    mlx_lm/models/muse_spark.py `sanitize` (global_scale = weight_scale_2 * 6 * 448).
  - compressed-tensors `nvfp4-pack-quantized` ("compressed_tensors"): `X.weight_packed` U8 (out, in/2),
    `X.weight_scale` F8_E4M3 (out, in/16), `X.weight_global_scale` F32 (1,) = (6 * 448) / amax;
    value = e2m1 * e4m3 / weight_global_scale (DIVIDE).  `X.input_global_scale` is ignored.
    Sources: compressed-tensors compressors/quantized_compressors/fp4_quantized.py
    `NVFP4PackedCompressor.decompress_weight` (dequantize(..., global_scale)) and `pack_fp4_to_uint8`
    (low nibble = element 2i); vLLM compressed_tensors_w4a16_nvfp4.py ("ct stores the inverse":
    weight_global_scale = 1 / weight_global_scale).
Exactness: e2m1 * e4m3 * float32 has <= 30 significant bits, exact in float64 (ModelOpt).  The
compressed-tensors quotient is not a binary float; the decoder keeps its correctly rounded
float64 value.  A single later rounding to <= 24 bits equals rounding the true quotient: a
quotient a/g (a <= 6 bits, g 24 bits) that is not itself a midpoint of the target differs from
every midpoint m by |a - m*g|/g >= 2^-49 relative, far more than float64's 2^-53.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec, Exact, SourceGroup, row_range, values_of
from fmtconv.formats.parts import byte_rows, expect_shape, info_shape, refuse_nonfinite, stem
from fmtconv.formats.registry import register_codec
from fmtconv.formats.rounding import to_float32_odd
from fmtconv.kernels_ref import E2M1_MAX, E2M1_VALUES, E4M3_MAX, e2m1_encode, e4m3_decode, e4m3_encode, pack_fp4, unpack_fp4

GROUP = 16  # NVFP4 block size (vLLM ModelOpt/compressed-tensors schemes: group_size = 16)
LAYOUTS = {
    # layout -> (weight suffix, scale suffix, global suffix, ignored activation-scale suffix)
    "modelopt": (".weight", ".weight_scale", ".weight_scale_2", ".input_scale"),
    "compressed_tensors": (".weight_packed", ".weight_scale", ".weight_global_scale", ".input_global_scale"),
}


def _global_fits(gshape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """One value, or the weight's leading dimensions (one per expert of a stacked tensor)."""
    return int(np.prod(gshape)) == 1 or (0 < len(gshape) < len(shape) - 1 and tuple(gshape) == tuple(shape[: len(gshape)]))


@register_codec
class Nvfp4Codec(Codec):
    """NVFP4 from ModelOpt (multiply by weight_scale_2) and compressed-tensors (divide by weight_global_scale)."""

    name: ClassVar[str] = "nvfp4"
    roles: ClassVar[tuple[str, ...]] = ("weight", "scale", "global_scale")
    priority: ClassVar[int] = 10

    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        groups = []
        for name, info in tensors.items():
            for layout, (wsuf, ssuf, gsuf, isuf) in LAYOUTS.items():
                base = stem(name, wsuf)
                if base is None or base + gsuf not in tensors or base + ssuf not in tensors:
                    continue
                sname, gname = base + ssuf, base + gsuf
                s, g = tensors[sname], tensors[gname]
                wshape = info_shape(info)
                if info.dtype != "U8" or not wshape:
                    raise FmtconvError(f"NVFP4 ({layout}) weight: expected U8 packed pairs, got {info.dtype} {wshape}", tensor=name)
                shape = wshape[:-1] + (wshape[-1] * 2,)
                want = shape[:-1] + (shape[-1] // GROUP,)
                if shape[-1] % GROUP or s.dtype != "F8_E4M3" or info_shape(s) != want:
                    raise FmtconvError(f"NVFP4 ({layout}) scale: expected F8_E4M3 {want} for weight {wshape}, got {s.dtype} {info_shape(s)}", tensor=sname)
                if g.dtype != "F32" or not _global_fits(info_shape(g), shape):
                    raise FmtconvError(f"NVFP4 ({layout}) global scale: expected one F32 value, or one per leading index of "
                                       f"{shape}, got {g.dtype} {info_shape(g)}", tensor=gname)
                parts = {"weight": name, "scale": sname, "global_scale": gname}
                if base + isuf in tensors:
                    parts["input_scale"] = base + isuf
                groups.append(SourceGroup(f"{base}.weight", cls.name, parts, shape, {"layout": layout}))
        return groups

    def decode(self, parts, group, *, compute_dtype, rows=None) -> Exact:
        layout = group.params.get("layout", "modelopt")
        if layout not in LAYOUTS:
            raise FmtconvError(f"unknown NVFP4 layout {layout!r}; expected one of {sorted(LAYOUTS)}", tensor=group.name)
        for role in self.roles:
            if role not in parts:
                raise FmtconvError(f"NVFP4 ({layout}): missing the {role} part", tensor=group.parts.get(role, group.name))
        names = {r: group.parts.get(r, group.name) for r in self.roles}
        k, total = group.shape[-1], group.rows
        if k % GROUP:
            raise FmtconvError(f"NVFP4 needs inputs in multiples of {GROUP}, logical shape {group.shape}", tensor=group.name)
        expect_shape(parts["weight"], tuple(group.shape[:-1]) + (k // 2,), name=names["weight"], what=f"NVFP4 ({layout}) weight")
        expect_shape(parts["scale"], tuple(group.shape[:-1]) + (k // GROUP,), name=names["scale"], what=f"NVFP4 ({layout}) scale")
        start, stop = row_range(rows, total, group.name)
        packed = byte_rows(parts["weight"], total, k // 2, name=names["weight"], what=f"NVFP4 ({layout}) packed weight")[start:stop]
        sc = e4m3_decode(byte_rows(parts["scale"], total, k // GROUP, name=names["scale"], what=f"NVFP4 ({layout}) E4M3 scale")[start:stop])
        refuse_nonfinite(sc, name=names["scale"], what="NVFP4 E4M3 scale (0x7F/0xFF are NaN)")
        gs = self._global(parts["global_scale"], layout, names["global_scale"], total)[start:stop, None, None]
        n = packed.shape[0]
        elems = E2M1_VALUES[unpack_fp4(packed)].reshape(n, -1, GROUP).astype(np.float64)
        block = sc.astype(np.float64)[..., None]
        values = elems * block * gs if layout == "modelopt" else (elems * block) / gs
        return Exact(values.reshape(n, k), np.dtype(compute_dtype), self.name, dict(group.params))

    @staticmethod
    def _global(arr: np.ndarray, layout: str, name: str | None, rows: int) -> np.ndarray:
        """The global scale of every flattened row (float64): one value, or one per leading index."""
        g = np.asarray(arr, dtype=np.float64).reshape(-1)
        if g.size == 0 or rows % g.size:
            raise FmtconvError(f"NVFP4 ({layout}) global scale: {g.size} value(s) do not divide {rows} rows", tensor=name)
        if not (np.isfinite(g).all() and (g != 0).all()):
            raise FmtconvError(f"NVFP4 ({layout}) global scale: expected finite nonzero values, got {g[~np.isfinite(g) | (g == 0)][:4]}",
                               tensor=name)
        return np.repeat(g, rows // g.size)

    def encode(
        self,
        values: Exact | np.ndarray,
        *,
        layout: str = "modelopt",
        scale: np.ndarray | None = None,
        global_scale: float | np.ndarray | None = None,
        **_: Any,
    ) -> dict[str, np.ndarray]:
        """`{"weight": uint8, "scale": float8_e4m3fn, "global_scale": float32}` in `layout`.

        Without scales they are chosen as the producers do: global amax/(6*448) (ModelOpt) or
        (6*448)/amax (compressed-tensors) in float32, block scale = E4M3(block amax / 6 / global).
        """
        if layout not in LAYOUTS:
            raise FmtconvError(f"unknown NVFP4 layout {layout!r}; expected one of {sorted(LAYOUTS)}")
        v = np.asarray(values_of(values)).astype(np.float64)
        if v.ndim < 1 or v.shape[-1] % GROUP:
            raise FmtconvError(f"NVFP4 encode needs a last dimension that is a multiple of {GROUP}, got {v.shape}")
        if not np.isfinite(v).all():
            raise FmtconvError("NVFP4 encode refuses inf/NaN values")
        lead, k = v.shape[:-1], v.shape[-1]
        x = v.reshape(-1, k // GROUP, GROUP)
        if global_scale is None:
            amax = np.float32(np.abs(v).max()) if v.size else np.float32(0)
            amax = max(amax, np.float32(1e-12))
            g = np.float32(amax / np.float32(E2M1_MAX * E4M3_MAX)) if layout == "modelopt" else np.float32(np.float32(E2M1_MAX * E4M3_MAX) / amax)
        else:
            g = np.float32(np.asarray(global_scale).reshape(-1)[0])
        per_unit = float(g) if layout == "modelopt" else 1.0 / float(g)  # block scale units of the value
        if scale is None:
            bamax = np.abs(x).max(axis=-1)
            scodes = e4m3_encode(to_float32_odd(bamax / E2M1_MAX / per_unit))
        else:
            scodes = np.ascontiguousarray(np.asarray(scale)).view(np.uint8).reshape(x.shape[:2])
        sc = e4m3_decode(scodes).astype(np.float64)
        refuse_nonfinite(sc, name="scale", what="NVFP4 E4M3 scale")
        with np.errstate(divide="ignore", invalid="ignore"):
            if layout == "modelopt":
                denom = (sc * float(g))[..., None]
                y = np.where(denom == 0, x, x / denom)
            else:
                y = np.where(sc[..., None] == 0, x, x * float(g) / sc[..., None])
        codes = e2m1_encode(to_float32_odd(y)).reshape(lead + (k,))
        gshape = () if layout == "modelopt" else (1,)
        return {
            "weight": pack_fp4(codes),
            "scale": scodes.reshape(lead + (k // GROUP,)).view(ml_dtypes.float8_e4m3fn),
            "global_scale": np.full(gshape, g, dtype=np.float32),
        }
