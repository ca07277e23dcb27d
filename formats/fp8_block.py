"""FP8 (E4M3) weights with one scale per block of the last two axes, multiplied on dequantize.

Layouts (value = e4m3 * scale, the scale broadcast over its block, partial blocks at the edges):
  - "deepseek_v3": `X.weight` F8_E4M3 + `X.weight_scale_inv` F32 (ceil(out/128), ceil(in/128)).
    Source: DeepSeek-V3 inference/fp8_cast_bf16.py / kernel.py `weight_dequant` (y = x * s per
    128x128 block); mlx_lm/models/deepseek_v3.py `Model.sanitize` `dequant` (same, pads edges).
    The block comes from config quantization_config.weight_block_size (default [128, 128]).
  - "deepseek_v4": `X.weight` F8_E4M3 + `X.scale` F8_E8M0, same block grid (ue8m0 scales).
    Source: DeepSeek-V4 inference/model.py `Linear` (fp8 weight, scale float8_e8m0fnu of shape
    (ceil(out/block_size), ceil(in/block_size)), block_size = 128).
  - "compressed_tensors": `X.weight` F8_E4M3 + `X.weight_scale` (float-quantized): per-channel
    (out, 1), per-tensor (1,)/() or block.  Source: compressed-tensors
    quantization/lifecycle/forward.py `dequantize` (x_q * scale).
Exactness: e4m3 (<= 4 significant bits) times a float32/bfloat16/float16 scale has <= 28
significant bits, so the float64 product is exact (tests/test_formats_fp8.py proves it per
element); e4m3 times a power of two (E8M0) is exact in float32 unless the code overflows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec, Exact, SourceGroup, row_range, values_of
from fmtconv.formats.parts import (
    byte_rows,
    check_overflow,
    info_shape,
    prod,
    quantization_config,
    refuse_e8m0_nan,
    refuse_nonfinite,
    stem,
)
from fmtconv.formats.registry import register_codec
from fmtconv.formats.rounding import to_float32_odd
from fmtconv.kernels_ref import E4M3_MAX, e4m3_decode, e4m3_encode, e8m0_decode
from fmtconv.kernels_ref.tables import ceil_log2_ratio

DEFAULT_BLOCK = (128, 128)
_FLOAT_SCALES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}
_SCALE_SUFFIXES = (".weight_scale_inv", ".scale", ".weight_scale")


def grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Scale shape for a weight shape: leading axes, then ceil(out/bo), ceil(in/bi)."""
    *lead, out, k = shape
    return tuple(lead) + (-(-out // block[0]), -(-k // block[1]))


def scale_rows(start: int, stop: int, rows_per_matrix: int, block_rows: int) -> np.ndarray:
    """Row of the scale grid (flattened to 2-D) that each weight row [start, stop) (flattened to 2-D) uses."""
    r = np.arange(start, stop, dtype=np.int64)
    return (r // rows_per_matrix) * -(-rows_per_matrix // block_rows) + (r % rows_per_matrix) // block_rows


@dataclass(frozen=True)
class Fp8Rows:
    """Rows of an FP8 block weight in factored form: value = e4m3(codes[i, j]) * scale[srows[i], j // block_cols]."""

    codes: np.ndarray  # uint8 (rows, in): E4M3 codes
    scale: np.ndarray  # (scale rows, ceil(in / block_cols)): E8M0 codes (uint8) or float32/bfloat16/float16 values
    srows: np.ndarray  # int64 (rows,)
    block_cols: int
    scale_kind: str  # "e8m0" or "float"


def _block_for(wshape: tuple[int, ...], sshape: tuple[int, ...], config: Mapping[str, Any]) -> tuple[int, int] | None:
    """The block a scale shape implies: per-tensor, per-channel, or the configured block grid."""
    out, k = wshape[-2], wshape[-1]
    if prod(sshape) == 1 and len(sshape) <= 2:
        return (out, k)
    if sshape == wshape[:-1] + (1,):
        return (1, k)
    bs = quantization_config(config).get("weight_block_size") or DEFAULT_BLOCK
    block = (int(bs[0]), int(bs[1]))
    return block if sshape == grid(wshape, block) else None


@register_codec
class Fp8BlockCodec(Codec):
    """FP8 E4M3 x (float32 | bfloat16 | float16 | E8M0) block scales."""

    name: ClassVar[str] = "fp8_block"
    roles: ClassVar[tuple[str, ...]] = ("weight", "scale")
    priority: ClassVar[int] = 20

    @classmethod
    def recognise(cls, tensors: Mapping[str, Any], config: Mapping[str, Any]) -> list[SourceGroup]:
        groups = []
        for name, info in tensors.items():
            base = stem(name, ".weight")
            if base is None or info.dtype != "F8_E4M3":
                continue
            found = [base + s for s in _SCALE_SUFFIXES if base + s in tensors]
            if not found:
                raise FmtconvError(
                    "F8_E4M3 weight without a scale: expected one of " + ", ".join(base + s for s in _SCALE_SUFFIXES), tensor=name
                )
            sname = found[0]
            s = tensors[sname]
            wshape, sshape = info_shape(info), info_shape(s)
            if len(wshape) < 2:
                raise FmtconvError(f"FP8 weight: expected at least 2 axes, got {wshape}", tensor=name)
            if s.dtype == "F8_E8M0":
                kind, layout = "e8m0", "deepseek_v4"
            elif s.dtype in _FLOAT_SCALES:
                kind = "float"
                layout = "deepseek_v3" if sname.endswith("_scale_inv") else ("deepseek_v4" if sname.endswith(".scale") else "compressed_tensors")
            else:
                raise FmtconvError(f"FP8 scale: expected F32/BF16/F16 or F8_E8M0, got {s.dtype}", tensor=sname)
            block = _block_for(wshape, sshape, config)
            if block is None:
                raise FmtconvError(
                    f"FP8 scale: shape {sshape} fits no block of weight {wshape} "
                    f"(expected {grid(wshape, tuple(quantization_config(config).get('weight_block_size') or DEFAULT_BLOCK))}, "
                    f"{wshape[:-1] + (1,)} or one element)",
                    tensor=sname,
                )
            parts = {"weight": name, "scale": sname}
            groups.append(SourceGroup(name, cls.name, parts, wshape, {"layout": layout, "block": block, "scale_kind": kind}))
        return groups

    def decode(self, parts, group, *, compute_dtype, rows=None) -> Exact:
        block = tuple(group.params.get("block", DEFAULT_BLOCK))
        kind = group.params.get("scale_kind", "float")
        wname, sname = group.parts.get("weight", group.name), group.parts.get("scale", group.name)
        for role in ("weight", "scale"):
            if role not in parts:
                raise FmtconvError(f"FP8 block: missing the {role} part", tensor=group.parts.get(role, group.name))
        *lead, out, k = group.shape
        total = group.rows
        start, stop = row_range(rows, total, group.name)
        w = byte_rows(parts["weight"], total, k, name=wname, what="FP8 E4M3 weight")[start:stop]
        gshape = tuple(lead) + (-(-out // block[0]), -(-k // block[1]))
        s = np.asarray(parts["scale"])
        if s.size != prod(gshape):
            raise FmtconvError(f"FP8 scale: expected shape {gshape} for weight {tuple(group.shape)} with block {block}, got {s.shape}", tensor=sname)
        s = s.reshape(-1, gshape[-1])
        srows = scale_rows(start, stop, out, block[0])
        cols = np.arange(k) // block[1]
        vals = e4m3_decode(w)
        if np.isnan(vals).any():
            raise FmtconvError("FP8 weight holds E4M3 NaN codes (0x7F/0xFF); expected finite values", tensor=wname)
        if kind == "e8m0":
            codes = s.view(np.uint8)[srows]
            refuse_e8m0_nan(codes, name=sname)
            with np.errstate(over="ignore"):
                values = vals * e8m0_decode(codes)[:, cols]
            check_overflow(values, name=group.name)
        else:
            sc = s[srows].astype(np.float64)
            refuse_nonfinite(sc, name=sname, what="FP8 float scale")
            values = vals.astype(np.float64) * sc[:, cols]
        return Exact(values, np.dtype(compute_dtype), self.name, dict(group.params))

    def decode_to(self, parts, group, *, dtype, rows=None) -> np.ndarray | None:
        """E8M0-scaled rows rounded once to `dtype` by value table (kernels_ref.table_driven), the same values as
        `decode(...).to(dtype)` without float32 temporaries; None for float scales or parts `decode` would refuse."""
        if group.params.get("scale_kind") != "e8m0" or len(group.shape) < 2:
            return None
        from fmtconv.kernels_ref.table_driven import fp8_e8m0_rows_to_dtype

        out, k = group.shape[-2], group.shape[-1]
        block = tuple(int(b) for b in group.params.get("block", DEFAULT_BLOCK))
        w, s = np.asarray(parts["weight"]), np.asarray(parts["scale"])
        if w.size != group.rows * k or w.itemsize != 1 or s.itemsize != 1 or s.shape != grid(tuple(group.shape), block):
            return None  # decode() names what is wrong
        start, stop = row_range(rows, group.rows, group.name)
        codes = w.view(np.uint8).reshape(-1, k)[start:stop]
        return fp8_e8m0_rows_to_dtype(codes, s.view(np.uint8), start, out, block, np.dtype(dtype))

    def factored_rows(self, parts, group, *, rows=None) -> Fp8Rows | None:
        """Rows [start, stop) as codes, scale grid and scale-row index, without decoding; None where the parts do not
        have the shapes `decode` checks (it names what is wrong).  NaN codes and non-finite scales are not checked
        here: the kernels that take this form hand such rows back to `decode`, which refuses them."""
        if len(group.shape) < 2 or "weight" not in parts or "scale" not in parts:
            return None
        out, k = group.shape[-2], group.shape[-1]
        block = tuple(int(b) for b in group.params.get("block", DEFAULT_BLOCK))
        kind = "e8m0" if group.params.get("scale_kind") == "e8m0" else "float"
        w, s = np.asarray(parts["weight"]), np.asarray(parts["scale"])
        gshape = grid(tuple(group.shape), block)
        if w.size != group.rows * k or w.itemsize != 1 or s.size != prod(gshape) or (kind == "e8m0") != (s.itemsize == 1):
            return None
        if kind == "float" and s.dtype not in {np.dtype(t) for t in _FLOAT_SCALES.values()}:
            return None
        start, stop = row_range(rows, group.rows, group.name)
        codes = w.view(np.uint8).reshape(-1, k)[start:stop]
        return Fp8Rows(codes, s.reshape(-1, gshape[-1]), scale_rows(start, stop, out, block[0]), block[1], kind)

    def encode(
        self,
        values: Exact | np.ndarray,
        *,
        block: tuple[int, int] = DEFAULT_BLOCK,
        scale_kind: str = "float",
        scale: np.ndarray | None = None,
        **_: Any,
    ) -> dict[str, np.ndarray]:
        """`{"weight": float8_e4m3fn, "scale": float32 | float8_e8m0fnu}`.  With `scale`, the codes
        are encoded against it (saturating round-to-nearest-even); without, per block
        scale = amax/448 (float32) or 2^ceil(log2(amax/448)) (e8m0), amax >= 1e-4, as DeepSeek's
        inference/kernel.py `act_quant` (round_scale for ue8m0)."""
        v = np.asarray(values_of(values)).astype(np.float64)
        if v.ndim < 2:
            raise FmtconvError(f"FP8 block encode needs at least 2 axes, got {v.shape}")
        if not np.isfinite(v).all():
            raise FmtconvError("FP8 block encode refuses inf/NaN values")
        block = (int(block[0]), int(block[1]))
        *lead, out, k = v.shape
        gshape = grid(v.shape, block)
        srows = scale_rows(0, prod(v.shape[:-1]), out, block[0])
        cols = np.arange(k) // block[1]
        v2 = v.reshape(-1, k)
        if scale is None:
            amax = np.zeros((prod(gshape[:-1]), gshape[-1]))
            np.maximum.at(amax, (srows[:, None], cols[None, :]), np.abs(v2))
            amax = np.maximum(amax, 1e-4)
            if scale_kind == "e8m0":
                k = ceil_log2_ratio(amax, E4M3_MAX)
                sc64 = np.ldexp(1.0, k)
                stored = (k + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)
            else:
                sc64 = (amax / E4M3_MAX).astype(np.float32).astype(np.float64)
                stored = sc64.astype(np.float32)
        else:
            stored = np.asarray(scale).reshape(-1, gshape[-1])
            if scale_kind == "e8m0":
                codes = stored.view(np.uint8)
                refuse_e8m0_nan(codes, name="scale")
                sc64 = np.ldexp(1.0, codes.astype(np.int64) - 127)
            else:
                sc64 = stored.astype(np.float64)
                refuse_nonfinite(sc64, name="scale", what="FP8 float scale")
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(sc64[srows][:, cols] == 0, 0.0, v2 / sc64[srows][:, cols])
        codes = e4m3_encode(to_float32_odd(q)).view(ml_dtypes.float8_e4m3fn)
        return {"weight": codes.reshape(v.shape), "scale": stored.reshape(gshape)}
