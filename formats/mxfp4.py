"""MXFP4: E2M1 elements two per byte, one E8M0 scale per 32 consecutive inputs (OCP MX v1.0).

Value = e2m1 * 2^(code - 127); E8M0 code 255 is NaN and refused.  Every layout below packs
a row as consecutive bytes with the EVEN (first) element in the LOW nibble:
  - DeepSeek-V4 (layout "deepseek_v4"): routed experts `layers.N.ffn.experts.E.w1|w2|w3.weight`
    stored as I8 (out, in/2) next to `.scale` F8_E8M0 (out, in/32); config `expert_dtype: "fp4"`.
    Source: DeepSeek-V4 inference/convert.py `cast_e2m1fn_to_e4m3fn` (asserts torch.int8,
    `low = x & 0x0F` is element 2i) and inference/model.py `Linear` (fp4 weight (out, in//2)
    float4_e2m1fn_x2, scale (out, in//32) float8_e8m0fnu).
  - gpt-oss ("gpt_oss"): `X_blocks` U8 (..., rows, in/32, 16) and `X_scales` U8 (..., rows, in/32).
    Source: openai/gpt-oss gpt_oss/torch/weights.py `_get_mxfp4_tensor` (lut[blk & 0x0F] -> 0::2,
    scales - 127 via ldexp).
  - compressed-tensors `mxfp4-pack-quantized` ("compressed_tensors"): `X.weight_packed` U8 (out, in/2),
    `X.weight_scale` U8 E8M0 codes (out, in/32).  Sources: compressed-tensors
    compressors/quantized_compressors/fp4_quantized.py `pack_fp4_to_uint8` (indices[:, 0] | indices[:, 1] << 4),
    vLLM compressed_tensors_w4a16_mxfp4.py (weight_scale uint8 (out, in//32)).
  - MLX `mxfp4` mode ("mlx"): `X.weight` uint32 (..., in/8), `X.scales` uint8 (..., in/32); the
    same bytes read as little-endian words (kernels_ref/tables.py `unpack_fp4` names the MLX source).
Decoded values are exact in float32 (2 significant bits times a power of two) unless a scale
code >= 253 overflows it, which is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec, Exact, SourceGroup, row_range, values_of
from fmtconv.formats.parts import (
    byte_rows,
    check_overflow,
    expect_shape,
    info_shape,
    quantization_config,
    refuse_e8m0_nan,
    stem,
)
from fmtconv.formats.registry import register_codec
from fmtconv.formats.rounding import round_to_dtype, to_float32_odd
from fmtconv.kernels_ref import E2M1_VALUES, e2m1_encode, e8m0_decode, pack_fp4, unpack_fp4
from fmtconv.kernels_ref.tables import ceil_log2_ratio, floor_log2

GROUP = 32  # OCP MX v1.0 sec. 5: block size 32
LAYOUTS = ("deepseek_v4", "gpt_oss", "compressed_tensors", "mlx")
_E2M1_EMAX = 2  # OCP MX v1.0 table 1: E2M1 emax


def part_shapes(layout: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Stored shapes of the weight and scale parts for a logical (..., in) shape."""
    lead, k = tuple(shape[:-1]), int(shape[-1])
    if layout == "gpt_oss":
        return {"weight": lead + (k // GROUP, GROUP // 2), "scale": lead + (k // GROUP,)}
    if layout == "mlx":
        return {"weight": lead + (k // 8,), "scale": lead + (k // GROUP,)}
    return {"weight": lead + (k // 2,), "scale": lead + (k // GROUP,)}


def _ct_format(config: Mapping[str, Any]) -> str | None:
    qc = quantization_config(config)
    return qc.get("format") if qc.get("quant_method") == "compressed-tensors" else None


@register_codec
class Mxfp4Codec(Codec):
    """MXFP4 in every published layout (see module docstring); exact decode, lossless repacks."""

    name: ClassVar[str] = "mxfp4"
    roles: ClassVar[tuple[str, ...]] = ("weight", "scale")
    priority: ClassVar[int] = 10

    # ---- recognition -------------------------------------------------------------------
    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        groups = []
        for name, info in tensors.items():
            if (base := stem(name, "_blocks")) is not None and f"{base}_scales" in tensors:
                groups.append(cls._gpt_oss(base, info, tensors[f"{base}_scales"]))
            elif (base := stem(name, ".weight_packed")) is not None and f"{base}.weight_scale" in tensors:
                scale = tensors[f"{base}.weight_scale"]
                if scale.dtype in ("U8", "F8_E8M0") and _ct_format(config) in (None, "mxfp4-pack-quantized", "mixed-precision"):
                    groups.append(cls._packed_2d(base, name, info, f"{base}.weight_scale", scale, "compressed_tensors", ("U8",)))
            elif (base := stem(name, ".weight")) is not None and info.dtype in ("I8", "U8", "F4"):
                scale = tensors.get(f"{base}.scale")
                if scale is not None and scale.dtype == "F8_E8M0":
                    groups.append(cls._packed_2d(base, name, info, f"{base}.scale", scale, "deepseek_v4", ("I8", "U8", "F4")))
        return groups

    @classmethod
    def _gpt_oss(cls, base: str, blocks: Any, scales: Any) -> SourceGroup:
        bshape, sshape = info_shape(blocks), info_shape(scales)
        if blocks.dtype != "U8" or len(bshape) < 3 or bshape[-1] != GROUP // 2:
            raise FmtconvError(f"gpt-oss MXFP4 blocks: expected U8 (..., rows, groups, 16), got {blocks.dtype} {bshape}", tensor=blocks.name)
        if scales.dtype != "U8" or sshape != bshape[:-1]:
            raise FmtconvError(f"gpt-oss MXFP4 scales: expected U8 {bshape[:-1]}, got {scales.dtype} {sshape}", tensor=scales.name)
        shape = bshape[:-2] + (bshape[-2] * GROUP,)
        return SourceGroup(base, cls.name, {"weight": blocks.name, "scale": scales.name}, shape, {"layout": "gpt_oss"})

    @classmethod
    def _packed_2d(cls, base: str, wname: str, w: Any, sname: str, s: Any, layout: str, dtypes: tuple[str, ...]) -> SourceGroup:
        wshape = info_shape(w)
        if w.dtype not in dtypes or not wshape:
            raise FmtconvError(f"MXFP4 ({layout}) weight: expected {'/'.join(dtypes)} packed pairs, got {w.dtype} {wshape}", tensor=wname)
        shape = wshape if w.dtype == "F4" else wshape[:-1] + (wshape[-1] * 2,)
        if shape[-1] % GROUP:
            raise FmtconvError(f"MXFP4 ({layout}) weight: {shape[-1]} inputs is not a multiple of {GROUP}", tensor=wname)
        want = part_shapes(layout, shape)["scale"]
        if info_shape(s) != want:
            raise FmtconvError(f"MXFP4 ({layout}) scale: expected shape {want} for weight {wshape}, got {info_shape(s)}", tensor=sname)
        return SourceGroup(f"{base}.weight", cls.name, {"weight": wname, "scale": sname}, shape, {"layout": layout})

    # ---- decode ------------------------------------------------------------------------
    @staticmethod
    def _rows(parts: Mapping[str, np.ndarray], group: SourceGroup, rows: tuple[int, int] | None):
        """(packed bytes, scale codes) of the requested rows, validated against the logical shape."""
        layout = group.params.get("layout", "deepseek_v4")
        if layout not in LAYOUTS:
            raise FmtconvError(f"unknown MXFP4 layout {layout!r}; expected one of {LAYOUTS}", tensor=group.name)
        k = group.shape[-1]
        if k % GROUP:
            raise FmtconvError(f"MXFP4 needs inputs in multiples of {GROUP}, logical shape {group.shape}", tensor=group.name)
        wname, sname = group.parts.get("weight", group.name), group.parts.get("scale", group.name)
        for role in ("weight", "scale"):
            if role not in parts:
                raise FmtconvError(f"MXFP4 ({layout}): missing the {role} part", tensor=group.parts.get(role, group.name))
        want = part_shapes(layout, group.shape)
        expect_shape(parts["weight"], want["weight"], name=wname, what=f"MXFP4 ({layout}) weight")
        expect_shape(parts["scale"], want["scale"], name=sname, what=f"MXFP4 ({layout}) scale")
        total = group.rows
        packed = byte_rows(parts["weight"], total, k // 2, name=wname, what=f"MXFP4 ({layout}) packed weight")
        codes = byte_rows(parts["scale"], total, k // GROUP, name=sname, what=f"MXFP4 ({layout}) E8M0 scale")
        start, stop = row_range(rows, total, group.name)
        s = codes[start:stop]
        refuse_e8m0_nan(s, name=sname)
        return packed[start:stop], s

    def decode(self, parts, group, *, compute_dtype, rows=None) -> Exact:
        packed, s = self._rows(parts, group, rows)
        n = packed.shape[0]
        elems = E2M1_VALUES[unpack_fp4(packed)].reshape(n, -1, GROUP)
        with np.errstate(over="ignore"):
            values = (elems * e8m0_decode(s)[..., None]).reshape(n, -1)
        check_overflow(values, name=group.name)
        return Exact(values, np.dtype(compute_dtype), self.name, dict(group.params))

    # ---- encode ------------------------------------------------------------------------
    def encode(self, values: Exact | np.ndarray, *, layout: str = "deepseek_v4", scale: np.ndarray | None = None, **_: Any) -> dict[str, np.ndarray]:
        """Parts in `layout`.  With `scale` (E8M0 codes, (..., in/32)) the elements are encoded
        against those scales (round-to-nearest-even, saturating); without, the scales follow the
        layout's producer: DeepSeek's 2^ceil(log2(amax/6)) for deepseek_v4, MLX's quantizer for
        mlx, the OCP MX v1.0 sec. 6.3 rule floor(log2(amax)) - emax for the others."""
        if layout not in LAYOUTS:
            raise FmtconvError(f"unknown MXFP4 layout {layout!r}; expected one of {LAYOUTS}")
        v = np.asarray(values_of(values))
        if v.ndim < 1 or v.shape[-1] % GROUP:
            raise FmtconvError(f"MXFP4 encode needs a last dimension that is a multiple of {GROUP}, got {v.shape}")
        lead, k = v.shape[:-1], v.shape[-1]
        if scale is None and layout == "mlx":
            from fmtconv.kernels_ref.fp import fp_quantize

            dt = values.compute_dtype if isinstance(values, Exact) else (v.dtype if v.dtype != np.float64 else np.float32)
            wq, sc = fp_quantize(round_to_dtype(v, dt), "mxfp4")
            return {"weight": wq, "scale": sc}
        x = v.astype(np.float64).reshape(-1, k // GROUP, GROUP)
        if not np.isfinite(x).all():
            raise FmtconvError("MXFP4 encode refuses inf/NaN values")
        if scale is None:
            codes = self.choose_scales(x, deepseek=layout == "deepseek_v4")
        else:
            codes = np.ascontiguousarray(np.asarray(scale)).view(np.uint8).reshape(x.shape[:2])
            refuse_e8m0_nan(codes, name="scale")
        mult = np.ldexp(1.0, 127 - codes.astype(np.int64))[..., None]  # 2^(127-s): exact in float64
        elem_codes = e2m1_encode(to_float32_odd(x * mult)).reshape(lead + (k,))
        return self._pack(pack_fp4(elem_codes), codes.reshape(lead + (k // GROUP,)), layout)

    @staticmethod
    def choose_scales(x: np.ndarray, *, deepseek: bool) -> np.ndarray:
        """E8M0 codes for groups x (..., 32) as the producer picks them (float64 in, uint8 out)."""
        amax = np.abs(x).max(axis=-1)
        if deepseek:
            # DeepSeek-V4 inference/kernel.py fp4_quant_kernel: amax >= 6*2^-126, scale = 2^ceil(log2(amax/6))
            e = ceil_log2_ratio(np.maximum(amax, 6 * 2.0**-126), 6.0)
        else:
            # OCP MX v1.0 sec. 6.3: shared_exp = floor(log2(amax)) - emax_elem; zero groups get 2^-127
            e = np.where(amax > 0, floor_log2(np.where(amax > 0, amax, 1.0)) - _E2M1_EMAX, -127)
        return (np.clip(e, -127, 127) + 127).astype(np.uint8)

    @staticmethod
    def _pack(packed: np.ndarray, codes: np.ndarray, layout: str) -> dict[str, np.ndarray]:
        lead = packed.shape[:-1]
        if layout == "deepseek_v4":
            return {"weight": packed.view(np.int8), "scale": codes.view(ml_dtypes.float8_e8m0fnu)}
        if layout == "gpt_oss":
            return {"weight": packed.reshape(lead + (-1, GROUP // 2)), "scale": codes}
        if layout == "mlx":
            return {"weight": np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False), "scale": codes}
        return {"weight": packed, "scale": codes}

    # ---- lossless routes ---------------------------------------------------------------
    def repack_to_mlx(self, parts: Mapping[str, np.ndarray], group: SourceGroup, rows: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
        """Any layout -> MLX mxfp4 `{"weight": uint32 (..., in/8), "scales": uint8 (..., in/32)}`, bytes unchanged.

        With `rows`, the result is 2-D (rows, ...) over the flattened logical tensor.
        """
        packed, s = self._rows(parts, group, rows)
        lead = group.shape[:-1] if rows is None else (packed.shape[0],)
        k = group.shape[-1]
        words = np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False)
        return {"weight": words.reshape(lead + (k // 8,)), "scales": np.array(s).reshape(lead + (k // GROUP,))}

    def to_affine5(
        self,
        parts: Mapping[str, np.ndarray],
        group: SourceGroup,
        *,
        compute_dtype: np.dtype,
        rows: tuple[int, int] | None = None,
    ) -> dict[str, np.ndarray]:
        """The exact MLX affine route: 5 bits, group 32, `{"weight", "scales", "biases"}`.

        Each group is e2m1 * 2^(s-127) = (2*e2m1 + 12) * 2^(s-128) - 12 * 2^(s-128): codes
        q = 2*e2m1 + 12 in 0..24, scale 2^(s-128), bias -12 * 2^(s-128).  Refused (FmtconvError)
        where the scale, the bias or any dequantized value (MLX's CPU two-rounding path and the
        GPU's fused one) is not exact in `compute_dtype`.  -0.0 elements come back as +0.0.
        """
        from fmtconv.kernels_ref.affine import affine_dequantize
        from fmtconv.kernels_ref.packing import pack_codes

        dt = np.dtype(compute_dtype)
        packed, s = self._rows(parts, group, rows)
        n, k = packed.shape[0], group.shape[-1]
        q = (2.0 * E2M1_VALUES[unpack_fp4(packed)] + 12.0).astype(np.uint8)
        scale64 = np.ldexp(1.0, s.astype(np.int64) - 128)
        wq = pack_codes(q, 5)
        with np.errstate(over="ignore", invalid="ignore"):
            scales, biases = round_to_dtype(scale64, dt), round_to_dtype(-12.0 * scale64, dt)
            exact = (scales.astype(np.float64) == scale64) & (biases.astype(np.float64) == -12.0 * scale64)
            want = (E2M1_VALUES[unpack_fp4(packed)].reshape(n, -1, GROUP) * e8m0_decode(s)[..., None]).reshape(n, k)
            for backend in ("cpu", "metal"):
                got = affine_dequantize(wq, scales, biases, GROUP, 5, backend=backend).astype(np.float64)
                exact &= (got == want).reshape(n, -1, GROUP).all(axis=-1)
        if not exact.all():
            r, g = (int(i) for i in np.argwhere(~exact)[0])
            start = row_range(rows, group.rows)[0]
            raise FmtconvError(
                f"MXFP4 -> affine 5-bit is not exact in {dt} at row {start + r}, group {g} "
                f"(E8M0 code {int(s[r, g])}: scale 2^{int(s[r, g]) - 128} or its values out of {dt}'s range); "
                f"use a wider compute dtype or a lossy target",
                tensor=group.name,
            )
        lead = group.shape[:-1] if rows is None else (n,)
        return {
            "weight": wq.reshape(lead + (k * 5 // 32,)),
            "scales": scales.reshape(lead + (k // GROUP,)),
            "biases": biases.reshape(lead + (k // GROUP,)),
        }
