"""Read an MLX bundle back without stopping at the first fault: config, index, shards, the quantization block.

Structure follows what mlx_lm 0.32.2 reads (mlx_lm/utils.py `load_model`, `infer_quant_config`,
`save_model`, `save_config`): shards `model*.safetensors` listed in `model.safetensors.index.json`
(`metadata.total_size` = the sum of the tensors' data bytes), `config.json` with `quantization`
(global `group_size`/`bits`/`mode` plus per-module overrides keyed by module path, each a dict or
false) mirrored into `quantization_config`, and for each quantized module P the tensors `P.weight`
(uint32), `P.scales` and, for affine only, `P.biases`.  Where the bundle's layout stores other names than its
runtime's (vMLX's DeepSeek-V4), the quantization keys name the runtime's module paths (`runtime_modules`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv.convert.naming import module_pattern, natural_key
from fmtconv.convert.recipes import QUANT_MODES
from fmtconv.errors import FmtconvError
from fmtconv.formats.dtypes import stored_dtype
from fmtconv.formats.safetensors_io import INDEX_NAME, SafetensorsFile, TensorInfo

CONFIG_NAME = "config.json"
# mlx_lm.utils.load_model globs `model*.safetensors`; save_model names shards model-0000K-of-0000N.
SHARD_GLOB = "model*.safetensors"
# The keys of mlx_lm's `quantization` block that are not module paths (mlx_lm.utils.quantize_model quant_params).
GLOBAL_QUANT_KEYS = ("group_size", "bits", "mode")
FLOAT_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": "bfloat16"}
ROW_BLOCK_ELEMENTS = 1 << 20  # elements per streamed block: bounded memory for any tensor size
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "U8": "uint8", "U32": "uint32"}


# ---------------------------------------------------------------------------------------------
# Reading a bundle without stopping at the first fault
# ---------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """What could be read of a bundle dir: config, index, parsed shards and every stored tensor."""

    root: Path
    config: dict[str, Any] | None = None
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int | None = None
    files: dict[str, SafetensorsFile] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def array(self, name: str) -> np.ndarray:
        return self.files[self.tensors[name].file.name].array(name)

    def release(self, name: str) -> None:
        self.files[self.tensors[name].file.name].release(name)

    def file_sizes(self) -> dict[str, int]:
        """Every file under the bundle (relative path -> bytes), hub-upload caches excluded."""
        out = {}
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if p.is_file() and not rel.parts[0].startswith("."):
                out[rel.as_posix()] = p.stat().st_size
        return out


def open_bundle(out_dir: str | Path) -> Bundle:
    """Read config, index and shard headers; faults become `problems` instead of exceptions."""
    b = Bundle(Path(out_dir))
    if not b.root.is_dir():
        b.problems.append(f"{b.root}: not a directory")
        return b
    b.config = _read_json(b.root / CONFIG_NAME, b.problems)
    if b.config is not None and not isinstance(b.config, dict):
        b.problems.append(f"{CONFIG_NAME}: expected a JSON object, got {type(b.config).__name__}")
        b.config = None
    index = _read_json(b.root / INDEX_NAME, b.problems)
    if isinstance(index, dict):
        wm = index.get("weight_map")
        if isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values()):
            b.weight_map = dict(wm)
        else:
            b.problems.append(f"{INDEX_NAME}: expected 'weight_map' as an object of tensor name -> shard file")
        ts = (index.get("metadata") or {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
        if isinstance(ts, int) and not isinstance(ts, bool):
            b.total_size = ts
        else:
            b.problems.append(f"{INDEX_NAME}: expected integer 'metadata.total_size', got {ts!r}")
    elif index is not None:
        b.problems.append(f"{INDEX_NAME}: expected a JSON object")
    by_file: dict[str, list[str]] = {}
    for t, f in b.weight_map.items():
        by_file.setdefault(f, []).append(t)
    listed = sorted(by_file)
    on_disk = sorted(p.name for p in b.root.glob(SHARD_GLOB))
    for fname in listed:
        names = by_file[fname]
        if not (b.root / fname).is_file():
            b.problems.append(f"{fname}: listed in {INDEX_NAME} for {len(names)} tensor(s) (e.g. {names[0]!r}) but missing")
            continue
        if not Path(fname).match(SHARD_GLOB):
            b.problems.append(f"{fname}: shard name does not match {SHARD_GLOB!r}, so mlx_lm.load would not read it")
        _open_shard(b, fname)
    for fname in on_disk:
        if fname not in listed:
            b.problems.append(f"{fname}: shard on disk that {INDEX_NAME} does not list (mlx_lm.load reads every {SHARD_GLOB})")
            _open_shard(b, fname)
    for fname, f in b.files.items():
        absent = sorted(t for t in by_file.get(fname, ()) if t not in f.tensors)
        if absent:
            b.problems.append(f"{fname}: {INDEX_NAME} maps {len(absent)} tensor(s) to this shard that it does not hold "
                              f"({_examples(absent)})")
        if fname not in listed:
            continue  # reported above as a whole
        unlisted = sorted(t for t in f.tensors if b.weight_map.get(t) != fname)
        if unlisted:
            b.problems.append(f"{fname}: holds {len(unlisted)} tensor(s) that are not in {INDEX_NAME} under this shard "
                              f"({_examples(unlisted)})")
    if b.total_size is not None and all((b.root / f).is_file() for f in listed):
        actual = sum(b.tensors[t].nbytes for t in b.weight_map if t in b.tensors)
        if actual != b.total_size:
            b.problems.append(f"{INDEX_NAME}: metadata.total_size is {b.total_size}, but the listed tensors hold {actual} bytes")
    return b


def _examples(names: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(x) for x in names[:n])
    return shown + (f", ... {len(names) - n} more" if len(names) > n else "")


def _read_json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        problems.append(f"{path.name}: missing")
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        problems.append(f"{path.name}: not readable JSON ({e})")
        return None


def _open_shard(b: Bundle, fname: str) -> None:
    try:
        f = SafetensorsFile(b.root / fname)
    except FmtconvError as e:
        b.problems.append(f"{fname}: unreadable safetensors file ({e})")
        return
    b.files[fname] = f
    for name, info in f.tensors.items():
        if name in b.tensors:
            b.problems.append(f"{fname}: tensor {name!r} is also stored in {b.tensors[name].file.name}")
            continue
        b.tensors[name] = info


# ---------------------------------------------------------------------------------------------
# The quantization block and the modules it describes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantParams:
    mode: str
    bits: int
    group_size: int
    global_scale: bool = False


@dataclass(frozen=True)
class ModuleEntry:
    """One weight as the runtime sees it: a quantized module P (P.weight/scales/biases) or a dense tensor."""

    name: str  # module path P for quantized modules, the tensor name for dense tensors
    mode: str  # affine | mxfp4 | mxfp8 | nvfp4 | dense
    bits: int | None  # quantized bits, or the dense dtype's width
    group_size: int | None
    dtype: str  # dense dtype / affine scales dtype / "uint8" scales of the mx modes
    params: int  # logical number of weights
    nbytes: int  # stored bytes of all its tensors

    @property
    def pattern(self) -> str:
        return module_pattern(self.name)

    @property
    def quantized(self) -> bool:
        return self.mode != "dense"

    @property
    def label(self) -> str:
        return f"{self.bits}-bit {self.mode}" if self.quantized else self.dtype


def runtime_modules(config: Mapping[str, Any] | None) -> Callable[[str], str]:
    """Stored module path -> the runtime's, as the bundle's layout (its config's fmtconv record) renames them."""
    if not isinstance(config, Mapping):
        return lambda module: module
    from fmtconv.convert.layouts import bundle_layout

    return bundle_layout(dict(config)).runtime_module


def quant_block(config: Mapping[str, Any] | None) -> tuple[QuantParams | None, dict[str, QuantParams | bool], list[str]]:
    """(global default, per-module overrides, problems) of config['quantization'] as mlx_lm reads it."""
    problems: list[str] = []
    q = (config or {}).get("quantization")
    if q is None:
        return None, {}, problems
    if not isinstance(q, dict):
        return None, {}, [f"{CONFIG_NAME}: 'quantization' must be an object, got {type(q).__name__}"]
    default = _params(q, "quantization", problems)
    overrides: dict[str, QuantParams | bool] = {}
    for key, value in q.items():
        if key in GLOBAL_QUANT_KEYS:
            continue
        if value is False or value is True:
            # mlx_lm's class_predicate returns the entry as is: True quantizes with the global default.
            overrides[key] = value if value is False else (default or False)
        elif isinstance(value, dict):
            p = _params(value, f"quantization[{key!r}]", problems)
            overrides[key] = p if p is not None else False
        else:
            problems.append(f"{CONFIG_NAME}: quantization[{key!r}] must be an object or false, got {value!r}")
    return default, overrides, problems


def _params(d: Mapping[str, Any], where: str, problems: list[str]) -> QuantParams | None:
    from fmtconv.kernels_ref import FP_MODES

    mode = d.get("mode", "affine")
    bits, group = d.get("bits"), d.get("group_size")
    if mode not in QUANT_MODES:
        problems.append(f"{CONFIG_NAME}: {where} mode {mode!r} is not one of {list(QUANT_MODES)}")
        return None
    if not (isinstance(bits, int) and isinstance(group, int)) or isinstance(bits, bool) or bits <= 0 or group <= 0:
        problems.append(f"{CONFIG_NAME}: {where} needs positive integer 'bits' and 'group_size', got bits={bits!r}, group_size={group!r}")
        return None
    if mode in FP_MODES and (group, bits) != FP_MODES[mode]:
        problems.append(f"{CONFIG_NAME}: {where} {mode} takes group_size={FP_MODES[mode][0]}, bits={FP_MODES[mode][1]}; got {group}, {bits}")
        return None
    return QuantParams(mode, bits, group, bool(d.get("global_scale", False)))


def bundle_modules(config: Mapping[str, Any] | None, tensors: Mapping[str, TensorInfo]) -> list[ModuleEntry]:
    """Every weight of the bundle as the runtime sees it, from the written config and the shard headers."""
    default, overrides, _ = quant_block(config)
    to_runtime = runtime_modules(config)
    taken: set[str] = set()
    entries = []
    for n in sorted(tensors):
        if not n.endswith(".scales") or n[: -len(".scales")] + ".weight" not in tensors:
            continue
        p = n[: -len(".scales")]
        q = overrides.get(to_runtime(p), default)
        if not isinstance(q, QuantParams):
            continue
        w, s = tensors[f"{p}.weight"], tensors[n]
        parts = [f"{p}.{k}" for k in ("weight", "scales", "biases", "global_scale") if f"{p}.{k}" in tensors]
        taken.update(parts)
        lead = int(np.prod(w.shape[:-1], dtype=np.int64)) if w.shape else 1
        entries.append(ModuleEntry(p, q.mode, q.bits, q.group_size, DTYPE_NAMES.get(s.dtype, s.dtype.lower()),
                                   lead * (s.shape[-1] * q.group_size if s.shape else 0), sum(tensors[x].nbytes for x in parts)))
    for n in sorted(tensors):
        if n in taken:
            continue
        i = tensors[n]
        sd = stored_dtype(i.dtype)
        entries.append(ModuleEntry(n, "dense", sd.bits if sd else None, None, DTYPE_NAMES.get(i.dtype, i.dtype), i.numel, i.nbytes))
    return entries


def pattern_table(entries: Iterable[ModuleEntry]) -> list[dict[str, Any]]:
    """Rows per (module pattern, mode, bits, group size, dtype): count, params, bytes; in first-seen order."""
    rows: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        k = (e.pattern, e.mode, e.bits, e.group_size, e.dtype)
        r = rows.setdefault(k, {"pattern": e.pattern, "mode": e.mode, "bits": e.bits, "group_size": e.group_size,
                                "dtype": e.dtype, "count": 0, "params": 0, "bytes": 0})
        r["count"] += 1
        r["params"] += e.params
        r["bytes"] += e.nbytes
    return sorted(rows.values(), key=lambda r: natural_key(r["pattern"]))
