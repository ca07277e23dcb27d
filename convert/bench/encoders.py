"""`fmtconv bench encoders`: SQNR of the two affine encoders by tensor class x bits x group size.

Classes:
  synthetic (seeded, 512 x 4096 each): MXFP4 expert weights (N(0,1) values quantized by MLX's own mxfp4
  rule, kernels_ref.fp_quantize), dense bfloat16 N(0,1), dense bfloat16 Laplace (heavier tails);
  each `--source` checkpoint: its quantizable weights by source format (mxfp4, fp8_block, dense), through
  the pipeline's own routes (encoder_compare.encode_and_measure).
SQNR pools signal and noise over all tensors of a class; both encoders see identical inputs and write
identical bytes on disk (same bits and group size).  Synthetic rows also give each encoder's time per
element on one thread of this machine (kernel only, no I/O).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

BITS = (3, 4, 8)
GROUPS = (32, 64, 128)
_SHAPE = (512, 4096)


def _sqnr(ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    r = ref.astype(np.float64)
    d = test.astype(np.float64) - r
    return float(np.dot(r.ravel(), r.ravel())), float(np.dot(d.ravel(), d.ravel()))


def _db(signal: float, noise: float) -> float:
    return math.inf if noise == 0 else 10.0 * math.log10(signal / noise)


_BOUND_GROUPS = 600


def _bound_db(x: np.ndarray, bits: int, g: int, minmax_out: tuple) -> float:
    """Gain over minmax of an exhaustive search (affine_mse.exhaustive_sse: 161 widths x 81 offsets, real-valued
    scale and bias) on the first groups: what the format allows these values, before rounding to the dtype."""
    from fmtconv.kernels_ref import affine_dequantize
    from fmtconv.kernels_ref.affine_mse import exhaustive_sse

    rows = _BOUND_GROUPS * g // x.shape[1]
    xs = np.ascontiguousarray(x[:rows]).astype(np.float32)
    deq = affine_dequantize(*(a[:rows] for a in minmax_out), g, bits, backend="cpu").astype(np.float64)
    e_mm = ((deq - xs.astype(np.float64)) ** 2).reshape(-1, g).sum(axis=1)
    e = exhaustive_sse(xs.reshape(-1, g), bits, np.linspace(0.7, 1.1, 161), np.linspace(-0.1, 0.3, 81))
    return 10.0 * math.log10(e_mm.sum() / np.minimum(e, e_mm).sum())


def _synthetic(kernel_backend: str, bound: bool = False) -> list[dict[str, Any]]:
    from fmtconv.kernels_ref import affine_dequantize, affine_quantize, fp_quantize
    from fmtconv.kernels_ref.affine_mse import affine_quantize_mse
    from fmtconv.kernels_ref.mxfp4_mse import affine_quantize_mxfp4_mse
    from fmtconv.kernels_ref.table_driven import _value_table, affine_quantize_mxfp4

    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(16)
    wq, codes = fp_quantize(rng.standard_normal(_SHAPE).astype(np.float32), "mxfp4", backend="cpu")
    packed = np.ascontiguousarray(wq).view(np.uint8)
    nib = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(_SHAPE)
    mx_values = _value_table(bf16.name)[0][np.repeat(codes, 32, axis=1), nib]
    classes: list[tuple[str, np.ndarray, Callable, Callable]] = [
        ("MXFP4 experts (synthetic N(0,1))", mx_values,
         lambda g, b: affine_quantize_mxfp4(packed, codes, g, b, dtype=bf16, backend=kernel_backend),
         lambda g, b: affine_quantize_mxfp4_mse(packed, codes, g, b, dtype=bf16, backend=kernel_backend)),
    ]
    for label, w in (("dense bf16 (synthetic N(0,1))", rng.standard_normal(_SHAPE)),
                     ("dense bf16 (synthetic Laplace)", rng.laplace(0.0, 1.0, _SHAPE))):
        x = w.astype(np.float32).astype(bf16)
        classes.append((label, x.astype(np.float32),
                        lambda g, b, x=x: affine_quantize(x, g, b, backend=kernel_backend),
                        lambda g, b, x=x: affine_quantize_mse(x, g, b, backend=kernel_backend)))
    rows = []
    for label, ref, minmax, mse in classes:
        for bits in BITS:
            for g in GROUPS:
                row: dict[str, Any] = {"class": label, "bits": bits, "group_size": g, "numel": int(ref.size)}
                for enc, fn in (("minmax", minmax), ("mse", mse)):
                    t0 = time.perf_counter()
                    out = fn(g, bits)
                    row[f"{enc}_ns_per_el"] = round((time.perf_counter() - t0) / ref.size * 1e9, 2)
                    deq = affine_dequantize(*out, g, bits, backend="cpu")
                    row[f"{enc}_db"] = _db(*_sqnr(ref, deq))
                    if enc == "minmax" and bound and label.startswith("dense") and bits == 4 and g in (32, 64):
                        row["bound_gain_db"] = round(_bound_db(ref, bits, g, out), 3)
                rows.append(_finish(row))
    return rows


def _from_source(src: Path, kernel_backend: str) -> list[dict[str, Any]]:
    from fmtconv.convert.check.encoder_compare import encode_and_measure
    from fmtconv.convert.encode import TensorEncoder
    from fmtconv.convert.plan import build_plan
    from fmtconv.convert.recipes import recipe_from_dict
    from fmtconv.formats.safetensors_io import Checkpoint

    keep_all = recipe_from_dict({"name": "keep", "rules": [{"mode": "keep"}]})
    plan = build_plan(src, keep_all, kernel_backend=kernel_backend)
    tensors = [pt for pt in plan.tensors if pt.target.quantizable and pt.target.name.endswith(".weight") and len(pt.shape) >= 2]
    rows = []
    with Checkpoint(src) as ck:
        conv = TensorEncoder(plan)
        for bits in BITS:
            for g in GROUPS:
                pooled: dict[str, dict[str, list[float]]] = {}
                for pt in tensors:
                    if pt.shape[-1] % g:
                        continue
                    cls = pooled.setdefault(pt.source_codec, {"minmax": [0.0, 0.0, 0], "mse": [0.0, 0.0, 0]})
                    for enc, st in encode_and_measure(conv, ck, pt, bits, g).items():
                        cls[enc][0] += st.signal
                        cls[enc][1] += st.noise
                        cls[enc][2] += st.count
                for codec, p in sorted(pooled.items()):
                    rows.append(_finish({"class": f"{src.name}: {codec}", "bits": bits, "group_size": g, "numel": p["minmax"][2],
                                         "minmax_db": _db(*p["minmax"][:2]), "mse_db": _db(*p["mse"][:2])}))
    return rows


def _finish(row: dict[str, Any]) -> dict[str, Any]:
    row["gain_db"] = row["mse_db"] - row["minmax_db"]
    for k in ("minmax_db", "mse_db", "gain_db"):
        row[k] = round(row[k], 3) if math.isfinite(row[k]) else str(row[k])
    return row


def run_encoder_bench(sources: Iterable[str | Path] = (), *, kernel_backend: str = "cpu", bound: bool = False) -> list[dict[str, Any]]:
    """Rows of class, bits, group_size, numel, minmax_db, mse_db, gain_db (and ns per element for synthetic classes;
    with bound, for the dense synthetic classes at 4 bits, group 32 and 64, the gain an exhaustive search finds)."""
    rows = _synthetic(kernel_backend, bound)
    for src in sources:
        rows += _from_source(Path(src), kernel_backend)
    return rows


def _f2(x: Any) -> str:
    return x if isinstance(x, str) else f"{x:.2f}"


def print_encoder_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    out = ["| tensor class | bits | group | minmax dB | mse dB | gain dB | exhaustive-search gain dB | mse / minmax time |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = f"{r['mse_ns_per_el'] / r['minmax_ns_per_el']:.1f}x" if r.get("minmax_ns_per_el") else ""
        gain = r["gain_db"] if isinstance(r["gain_db"], str) else f"{r['gain_db']:+.2f}"
        bound = f"{r['bound_gain_db']:+.2f}" if "bound_gain_db" in r else ""
        out.append(f"| {r['class']} | {r['bits']} | {r['group_size']} | {_f2(r['minmax_db'])} | {_f2(r['mse_db'])} | {gain} | {bound} | {t} |")
    return "\n".join(out)
