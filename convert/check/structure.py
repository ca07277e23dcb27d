"""The structure `mlx_lm.load` relies on: an MLX quantization block with nothing of the source's left, every
quantized module's parts in the shapes and dtypes its bits and group size imply, and finite scales and biases.

Structure follows what mlx_lm 0.32.2 reads (mlx_lm/utils.py `load_model`, `infer_quant_config`, `save_config`).
"""

from __future__ import annotations

import numpy as np

from fmtconv.convert.bundle.reader import (
    CONFIG_NAME,
    FLOAT_DTYPES,
    ROW_BLOCK_ELEMENTS,
    Bundle,
    QuantParams,
    quant_block,
    runtime_modules,
)

# Keys of the quantization blocks sources publish (DeepSeek FP8, compressed-tensors, ModelOpt, gpt-oss mxfp4):
# seen in an output config they mean a loader may dequantize again or misread the MLX tensors.
SOURCE_QUANT_KEYS = (
    "quant_method", "weight_block_size", "fmt", "scale_fmt", "activation_scheme", "config_groups", "format",
    "quant_algo", "kv_cache_scheme", "kv_cache_quant_algo", "quantization_status", "ignore", "exclude_modules",
    "modules_to_not_convert", "producer",
)
# ModelOpt keeps its quantization block in this side file; mlx_lm.utils.load_model reads it when
# config.json has no quantization_config.
MODELOPT_QUANT_FILE = "hf_quant_config.json"


def check_config(b: Bundle) -> list[str]:
    """The quantization block is MLX's and nothing of the source's quantization block is left."""
    problems: list[str] = []
    config = b.config or {}
    q = config.get("quantization")
    qc = config.get("quantization_config")
    if qc is not None:
        leftover = [k for k in SOURCE_QUANT_KEYS if isinstance(qc, dict) and k in qc]
        if leftover:
            shown = ", ".join(f"{k}={qc[k]!r}" for k in leftover)
            problems.append(f"{CONFIG_NAME}: leftover source quantization block in 'quantization_config' ({shown}); "
                            "expected the MLX 'quantization' block or nothing")
        elif q is None:
            problems.append(f"{CONFIG_NAME}: 'quantization_config' present without 'quantization' "
                            "(mlx_lm would take its legacy path); expected both or neither")
        elif qc != q:
            problems.append(f"{CONFIG_NAME}: 'quantization_config' differs from 'quantization'; expected a copy "
                            "(mlx_lm.utils.save_config writes the same dict under both)")
    text = config.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("quantization_config"), dict):
        keys = [k for k in SOURCE_QUANT_KEYS if k in text["quantization_config"]]
        if keys:
            problems.append(f"{CONFIG_NAME}: leftover source quantization block in 'text_config.quantization_config' "
                            f"({', '.join(keys)}); mlx_lm copies it up when 'quantization_config' is absent")
    if "compression_config" in config:
        problems.append(f"{CONFIG_NAME}: leftover source 'compression_config' (compressed-tensors); expected none")
    if (b.root / MODELOPT_QUANT_FILE).exists():
        problems.append(f"{MODELOPT_QUANT_FILE}: leftover ModelOpt quantization file; expected none in an MLX bundle")
    return problems


def check_modules(b: Bundle) -> list[str]:
    """Every quantized module has its parts, with shapes and dtypes that fit its bits and group size."""
    problems: list[str] = []
    default, overrides, qp = quant_block(b.config)
    problems += qp
    t = b.tensors
    to_runtime = runtime_modules(b.config)
    stored = {to_runtime(n[: -len(".weight")]): n[: -len(".weight")] for n in t if n.endswith(".weight")}
    renamed = any(r != m for r, m in stored.items())
    for key in sorted(overrides):
        if key not in stored:
            where = "no stored tensor is renamed to it by the runtime's sanitize" if renamed else f"no tensor {key + '.weight'!r} in the bundle"
            problems.append(f"{CONFIG_NAME}: quantization override {key!r} names no module: {where}")
    candidates = {n[: -len(".scales")] for n in t if n.endswith(".scales")}
    candidates |= {n[: -len(".weight")] for n, i in t.items() if n.endswith(".weight") and i.dtype == "U32"}
    candidates |= {stored[k] for k, v in overrides.items() if v is not False and k in stored}
    if candidates and default is None and "quantization" not in (b.config or {}):
        problems.append(f"{CONFIG_NAME}: no 'quantization' block, but {len(candidates)} module(s) are stored quantized "
                        f"(e.g. {sorted(candidates)[0]!r})")
        return problems
    for p in sorted(candidates):
        params = overrides.get(to_runtime(p), default)
        if params is False or params is None:
            why = "its quantization override is false" if to_runtime(p) in overrides else "the config gives no default"
            problems.append(f"{p}: stored quantized (has {'.scales' if p + '.scales' in t else 'uint32 .weight'}) but {why}")
            continue
        problems += _check_module(b, p, params)
    return problems


def _check_module(b: Bundle, p: str, q: QuantParams) -> list[str]:
    t = b.tensors
    where = lambda n: f"{t[n].file.name}: tensor {n!r}"  # noqa: E731
    out: list[str] = []
    w, s, bi = f"{p}.weight", f"{p}.scales", f"{p}.biases"
    desc = f"{q.mode} bits={q.bits} group_size={q.group_size}"
    for n in (w, s) + ((bi,) if q.mode == "affine" else ()):
        if n not in t:
            out.append(f"{p}: missing tensor {n!r} ({desc} needs {p}.weight, {p}.scales"
                       + (f", {p}.biases)" if q.mode == "affine" else ")"))
    if q.mode != "affine" and bi in t:
        out.append(f"{where(bi)}: {q.mode} has no biases; mlx_lm.load (strict) would reject it")
    if q.global_scale and f"{p}.global_scale" not in t:
        out.append(f"{p}: missing tensor {p + '.global_scale'!r} (the config sets global_scale)")
    if out:
        return out
    wi, si = t[w], t[s]
    if wi.dtype != "U32":
        out.append(f"{where(w)}: dtype {wi.dtype}, expected U32 (packed {q.mode} codes)")
    want_scale = ("BF16", "F16", "F32") if q.mode == "affine" else ("U8",)
    if si.dtype not in want_scale:
        out.append(f"{where(s)}: dtype {si.dtype}, expected {' or '.join(want_scale)} for {q.mode}")
    if q.mode == "affine":
        bb = t[bi]
        if (bb.dtype, bb.shape) != (si.dtype, si.shape):
            out.append(f"{where(bi)}: {bb.dtype}{list(bb.shape)}, expected the scales' {si.dtype}{list(si.shape)}")
    if not wi.shape or not si.shape or wi.shape[:-1] != si.shape[:-1]:
        out.append(f"{where(w)}: shape {list(wi.shape)} does not match scales {list(si.shape)} on the leading dims")
        return out
    in_features = si.shape[-1] * q.group_size
    if (in_features * q.bits) % 32 or wi.shape[-1] != in_features * q.bits // 32:
        out.append(f"{where(w)}: shape {list(wi.shape)} does not fit {desc} with scales {list(si.shape)}: "
                   f"expected last dim {in_features} * {q.bits} / 32 = {in_features * q.bits / 32:g}")
    return out


def check_finite(b: Bundle) -> list[str]:
    """No NaN/Inf in scales or biases (float scales as stored; uint8 scales decoded as E8M0 / E4M3)."""
    from fmtconv.kernels_ref import e4m3_decode, e8m0_decode

    default, overrides, _ = quant_block(b.config)
    to_runtime = runtime_modules(b.config)
    problems = []
    for name in sorted(b.tensors):
        if not (name.endswith(".scales") or name.endswith(".biases")):
            continue
        info = b.tensors[name]
        module = name.rsplit(".", 1)[0]
        q = overrides.get(to_runtime(module), default)
        if info.dtype in FLOAT_DTYPES:
            decode = lambda x: x  # noqa: E731
        elif info.dtype == "U8" and isinstance(q, QuantParams) and q.mode in ("mxfp4", "mxfp8"):
            decode = e8m0_decode
        elif info.dtype == "U8" and isinstance(q, QuantParams) and q.mode == "nvfp4":
            decode = e4m3_decode
        else:
            continue  # dtype faults are reported by check_modules
        flat = b.array(name).reshape(-1)
        bad = 0
        for i in range(0, flat.size, ROW_BLOCK_ELEMENTS):
            chunk = np.asarray(decode(flat[i : i + ROW_BLOCK_ELEMENTS]))  # isfinite in the stored dtype: no float32 copy
            bad += int(chunk.size - np.count_nonzero(np.isfinite(chunk)))
        b.release(name)
        if bad:
            out = f"{info.file.name}: tensor {name!r} has {bad} NaN/Inf value(s) of {flat.size}; expected all finite"
            problems.append(out)
    return problems
