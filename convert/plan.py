"""The conversion plan: every output tensor with its route, target, output parts and shard.

Built from the source index, config, layout and recipe before anything is written; `fmtconv plan`
prints it, the pipeline executes it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv import __version__
from fmtconv.convert.layouts import ModelLayout, TargetTensor, drafter_layout_for, layout_for
from fmtconv.convert.naming import module_pattern
from fmtconv.convert.recipes import ENCODERS, FP_MODE_PARAMS, QUANT_MODES, AffineRule, Recipe
from fmtconv.errors import FmtconvError
from fmtconv.formats import rounding
from fmtconv.formats.dense import PASSTHROUGH_DTYPES
from fmtconv.formats.dtypes import dtype_name_for, stored_dtype
from fmtconv.formats.safetensors_io import DEFAULT_SHARD_BYTES, Checkpoint, TensorSpec, assign_shards, shard_names

COMPUTE_DTYPES = {d.name: d for d in rounding.COMPUTE_DTYPES}  # "bfloat16" / "float16" / "float32" -> dtype
_ST_NAME = {name: dtype_name_for(d) for name, d in COMPUTE_DTYPES.items()}  # -> safetensors "BF16" / ...
_FROM_ST_NAME = {st: name for name, st in _ST_NAME.items()}
# Source codecs whose stored tensors are plain floats or integers (a passthrough is a byte copy).
_DENSE_CODEC = "dense"

# Routes, cheapest first.
DROP, PASSTHROUGH, CAST, REPACK, EXACT_AFFINE, REQUANT = "drop", "passthrough", "cast", "repack", "exact-affine", "requant"


@dataclass
class PlannedTensor:
    """One output tensor (or quantized module): where it comes from, what it becomes, how."""

    target: TargetTensor
    route: str
    mode: str  # affine | mxfp4 | mxfp8 | nvfp4 | dense
    bits: int | None
    group_size: int | None
    dtype: str  # compute / output float dtype name
    source_codec: str
    shape: tuple[int, ...]  # logical shape of the output weight
    parts: list[TensorSpec] = field(default_factory=list)
    rule: str = ""
    encoder: str | None = None  # affine re-quantization only: "minmax" | "mse"
    # The runtime's path of the module (ModelLayout.runtime_module): what recipe rules match and quantization keys
    # name; the stored module path (target.module) where the layout stores post-sanitize names.
    runtime_module: str = ""

    def __post_init__(self) -> None:
        self.runtime_module = self.runtime_module or self.target.module

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def params(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    @property
    def quantized(self) -> bool:
        return self.mode in QUANT_MODES


@dataclass
class Plan:
    source: Path
    config: dict[str, Any]
    compute_dtype: str
    kernel_backend: str
    rounding: str
    recipe: Recipe
    layout: ModelLayout
    tensors: list[PlannedTensor]
    dropped: list[str]
    warnings: list[str]
    shards: list[list[TensorSpec]]
    source_files: dict[str, tuple[int, int]]  # file name -> (size, mtime_ns), to detect changes
    source_bytes: int
    encoder: str = "minmax"  # the run's default affine encoder (a rule's `encoder` overrides it)
    # `--mtp`: the drafter bundle's own plan (its layout, tensors and shards; written to OUT-mtp), else None.
    drafter: Plan | None = None
    # `--fit` / `--target-bpw`: the allocation behind this plan's recipe (fmtconv.convert.fit.allocate.FitResult.to_json).
    fit: dict[str, Any] | None = None

    @property
    def shard_files(self) -> list[str]:
        return shard_names(len(self.shards))

    @property
    def total_bytes(self) -> int:
        """Bytes of this bundle's shards (the main bundle alone; see bytes_with_drafter)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def bytes_with_drafter(self) -> int:
        """Bytes of every bundle the run writes: this one's, plus the drafter's with `--mtp` (what a size budget counts)."""
        return self.total_bytes + (self.drafter.total_bytes if self.drafter is not None else 0)

    @property
    def total_params(self) -> int:
        return sum(t.params for t in self.tensors if t.route != DROP)

    @property
    def bits_per_weight(self) -> float:
        """Bytes on disk x 8 / parameters, as mlx_lm's compute_bits_per_weight counts them."""
        return self.total_bytes * 8 / max(self.total_params, 1)

    @property
    def runtime(self) -> str:
        """The runtime the bundle is written for (mlx-lm / mlx-vlm): its layout's."""
        return self.layout.runtime

    @property
    def model_module(self) -> str:
        """The runtime's model module that will load the bundle, e.g. mlx_vlm.models.deepseek_v4."""
        from fmtconv.convert.runtimes import runtime_named

        return runtime_named(self.runtime).model_module(self.layout.output_config(self.config))

    def weight_map(self) -> dict[str, str]:
        names = self.shard_files
        return {spec.name: names[i] for i, shard in enumerate(self.shards) for spec in shard}

    def quantization(self) -> dict[str, Any]:
        """mlx_lm's `quantization` block: the most common (group, bits, mode) as default, per-module entries keyed by
        the runtime's module paths (for the modules off the default, or for every one where the layout asks)."""
        quant = [t for t in self.tensors if t.quantized]
        if not quant:
            return {}
        key = lambda t: (t.group_size, t.bits, t.mode)  # noqa: E731
        (g, b, m), _ = Counter(key(t) for t in quant).most_common(1)[0]
        q: dict[str, Any] = {"group_size": g, "bits": b, "mode": m}
        for t in quant:
            if key(t) != (g, b, m) or self.layout.explicit_quantization:
                q[t.runtime_module] = {"group_size": t.group_size, "bits": t.bits, "mode": t.mode}
        return q

    def fingerprint(self) -> str:
        """Identifies the work: same source, recipe, dtype and backend give the same hash (for resume)."""
        h = hashlib.sha256()
        h.update(json.dumps([__version__, self.compute_dtype, self.kernel_backend, self.rounding, self.recipe.model_dump(mode="json")], sort_keys=True).encode())
        h.update(json.dumps(sorted(self.source_files.items())).encode())
        for t in self.tensors:
            h.update(json.dumps([t.target.name, t.route, t.mode, t.bits, t.group_size, t.dtype, [(p.name, p.dtype, p.shape) for p in t.parts]]).encode())
            if t.encoder == "mse":  # minmax plans keep the fingerprint they had before encoders existed
                h.update(b"encoder=mse")
        return h.hexdigest()

    def encoder_patterns(self) -> dict[str, str]:
        """Module pattern -> affine encoder, for every re-quantized affine module (config.json and the model card)."""
        return {module_pattern(t.target.module): t.encoder for t in self.tensors if t.encoder is not None}

    def table(self) -> list[dict[str, Any]]:
        """Per stored name pattern (layer index -> {i}): the runtime's path (a quantized module's, else the tensor's), mode,
        bits, group size, route, count, bytes."""
        rows: dict[tuple, dict[str, Any]] = {}
        for t in self.tensors:
            if t.route == DROP:
                continue
            pattern = module_pattern(t.target.name)
            k = (pattern, t.mode, t.bits, t.group_size, t.dtype if not t.quantized else "", t.route)
            runtime = t.runtime_module if t.quantized else self.layout.runtime_name(t.target.name)
            r = rows.setdefault(k, {"pattern": pattern, "runtime_path": module_pattern(runtime), "mode": t.mode,
                                    "bits": t.bits, "group_size": t.group_size, "dtype": t.dtype, "route": t.route, "count": 0,
                                    "params": 0, "bytes": 0})
            r["count"] += 1
            r["params"] += t.params
            r["bytes"] += t.nbytes
        return list(rows.values())

    def dropped_patterns(self) -> dict[str, int]:
        """The dropped source tensors by name pattern (layer and expert indices -> {i}), with counts."""
        return dict(Counter(module_pattern(n) for n in self.dropped))

    def bit_distribution(self) -> dict[str, int]:
        """Parameters per bit width ('16' for bfloat16 kept tensors, etc.)."""
        dist: dict[str, int] = defaultdict(int)
        for t in self.tensors:
            if t.route == DROP:
                continue
            label = f"{t.bits}-bit {t.mode}" if t.quantized else f"{t.dtype}"
            dist[label] += t.params
        return dict(dist)

    def to_json(self) -> dict[str, Any]:
        out = self._json()
        if self.fit is not None:
            out["fit"] = self.fit
        if self.drafter is not None:
            out["drafter"] = self.drafter._json()
            out["total_bytes_with_drafter"] = self.bytes_with_drafter
        return out

    def _json(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "recipe": self.recipe.name,
            "layout": self.layout.family,
            "runtime": self.runtime,
            "model_module": self.model_module,
            "compute_dtype": self.compute_dtype,
            "kernel_backend": self.kernel_backend,
            "rounding": self.rounding,
            "encoder": self.encoder,
            "tensors": [
                {"name": t.target.name, "module": t.runtime_module, "route": t.route, "mode": t.mode, "bits": t.bits,
                 "group_size": t.group_size, "dtype": t.dtype, "source_codec": t.source_codec, "shape": list(t.shape),
                 "sources": [s.name for s in t.target.sources], "bytes": t.nbytes, "rule": t.rule, "encoder": t.encoder}
                for t in self.tensors
            ],
            "table": self.table(),
            "dropped": self.dropped,
            "dropped_patterns": self.dropped_patterns(),
            "warnings": self.warnings,
            "shards": len(self.shards),
            "total_bytes": self.total_bytes,
            "source_bytes": self.source_bytes,
            "total_params": self.total_params,
            "bits_per_weight": round(self.bits_per_weight, 4),
            "bit_distribution": self.bit_distribution(),
            "quantization": self.quantization(),
        }


def read_config(src: Path) -> dict[str, Any]:
    path = src / "config.json"
    if not path.is_file():
        raise FmtconvError("config.json is missing; the plan needs the model_type and dtype it declares", file=path)
    try:
        config = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise FmtconvError(f"not valid JSON ({e})", file=path) from None
    if not isinstance(config, dict):
        raise FmtconvError("must hold a JSON object", file=path)
    if "model_type" not in config:
        raise FmtconvError("has no 'model_type'; the converter needs it to choose the model layout", file=path)
    return config


def compute_dtype_of(config: dict[str, Any], override: str | None) -> str:
    """--dtype, else config's torch_dtype / dtype (top level or text_config), else bfloat16."""
    if override:
        if override not in COMPUTE_DTYPES:
            raise FmtconvError(f"--dtype {override!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        return override
    for c in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            v = c.get(key)
            if isinstance(v, str) and v in COMPUTE_DTYPES:
                return v
    return "bfloat16"


def num_layers_of(config: dict[str, Any]) -> int:
    for c in (config, config.get("text_config") or {}):
        for key in ("num_hidden_layers", "n_layers", "num_layers"):
            if isinstance(c.get(key), int):
                return c[key]
    return 0


def target_shape(t: TargetTensor) -> tuple[int, ...]:
    """Logical shape of a target: sources (rows-sliced along axis -2) stacked on a new axis when several."""
    src = t.sources[0]
    shape = list(src.shape)
    if t.rows is not None:
        shape[-2] = len(range(*slice(*t.rows).indices(shape[-2])))
    if t.transform is not None:  # a zero-stride view: reshapes and transposes of it cost no memory at any size
        probe = np.broadcast_to(np.zeros((), dtype=np.float32), tuple(shape))
        shape = list(t.transform(probe).shape)
    if len(t.sources) > 1:
        shape = [len(t.sources)] + shape
    return tuple(shape)


def parts_for(name: str, module: str, mode: str, bits: int, group: int, dtype: str, shape: tuple[int, ...]) -> list[TensorSpec]:
    """The stored tensors of one module quantized in `mode`: uint32 words, scales and (affine) biases, as MLX loads them."""
    lead, last = shape[:-1], shape[-1]
    words = last * bits // 32
    if mode == "affine":
        st = _ST_NAME[dtype]
        return [TensorSpec(f"{module}.weight", "U32", (*lead, words)), TensorSpec(f"{module}.scales", st, (*lead, last // group)),
                TensorSpec(f"{module}.biases", st, (*lead, last // group))]
    # MLX fp modes: uint32 words and uint8 (E8M0 / E4M3) scales, no biases (mlx/ops.cpp, quantize).
    return [TensorSpec(f"{module}.weight", "U32", (*lead, words)), TensorSpec(f"{module}.scales", "U8", (*lead, last // group))]


@dataclass
class _Source:
    """What planning reads from the source once, whichever layouts plan from it."""

    path: Path
    config: dict[str, Any]
    groups: list[Any]  # fmtconv.formats.base.SourceGroup
    stored: dict[str, str]  # tensor name -> stored safetensors dtype
    files: dict[str, tuple[int, int]]
    nbytes: int


def build_plan(
    src: str | Path,
    recipe: Recipe,
    *,
    compute_dtype: str | None = None,
    kernel_backend: str = "metal",
    rounding: str = "mlx-lm",
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    encoder: str = "minmax",
    runtime: str | None = None,
    mtp: bool = False,
) -> Plan:
    """Plan a conversion without writing anything (`runtime`: default, the one that owns the model_type; `mtp`: also
    plan the drafter bundle of the release's MTP layer, as `Plan.drafter`, with the same recipe and settings)."""
    from fmtconv.formats.grouping import find_groups

    src = Path(src)
    if kernel_backend not in ("metal", "cuda", "cpu"):
        raise FmtconvError(f"--kernel-backend {kernel_backend!r} is not one of metal, cuda, cpu")
    if rounding not in ("mlx-lm", "exact"):
        raise FmtconvError(f"--rounding {rounding!r} is not one of mlx-lm, exact")
    if encoder not in ENCODERS:
        raise FmtconvError(f"--encoder {encoder!r} is not one of {', '.join(ENCODERS)}")
    if not src.is_dir():
        raise FmtconvError("source must be a checkpoint directory", file=src)
    config = read_config(src)
    dtype = compute_dtype_of(config, compute_dtype)
    layout = layout_for(config, family, runtime)
    drafter_layout = drafter_layout_for(layout) if mtp else None
    with Checkpoint(src) as ck:
        source = _Source(src, config, find_groups(ck.tensors, config), {name: info.dtype for name, info in ck.tensors.items()},
                         {name: (f.stat().st_size, f.stat().st_mtime_ns) for name, f in ((n, sf.path) for n, sf in ck.files.items())},
                         sum(i.nbytes for i in ck.tensors.values()))
    settings = dict(dtype=dtype, kernel_backend=kernel_backend, rounding=rounding, max_shard_bytes=max_shard_bytes, encoder=encoder)
    main, modules = _plan_layout(layout, source, recipe, **settings)
    if drafter_layout is not None:
        main.drafter, drafter_modules = _plan_layout(drafter_layout, source, recipe, **settings)
        modules += drafter_modules
    for pattern in recipe.unused_rules(modules):  # a rule for the drafter's modules alone is used
        main.warnings.append(f"recipe rule match {pattern!r} selects no module")
    return main


def _plan_layout(layout: ModelLayout, source: _Source, recipe: Recipe, *, dtype: str, kernel_backend: str, rounding: str,
                 max_shard_bytes: int, encoder: str) -> tuple[Plan, list[str]]:
    """One bundle's plan: `layout`'s targets from the source, each given its route, target and shard; and the module
    paths the recipe was asked about (dropped by a rule included)."""
    config = source.config
    try:
        targets, dropped = layout.targets(source.groups, config)
    except KeyError as e:  # layouts index config.json directly for the fields they cannot do without
        key = e.args[0] if e.args else None
        if not isinstance(key, str) or key in config or key in (config.get("text_config") or {}):
            raise
        raise FmtconvError(f"has no {key!r}; the {layout.family} layout needs it", file=source.path / "config.json") from None
    except FmtconvError as e:
        if e.file is None and e.tensor is None:  # a layout's refusal of the source as a whole
            raise FmtconvError(str(e), file=source.path) from None
        raise
    n_layers = num_layers_of(config)
    warnings: list[str] = []
    planned: list[PlannedTensor] = []
    for t in targets:
        module = layout.runtime_name(t.name).rsplit(".", 1)[0]
        pt = _plan_one(t, module, recipe, dtype, n_layers, warnings, layout, source.stored)
        pt.runtime_module = module
        planned.append(_with_encoder(pt, recipe, n_layers, encoder))
    kept = [p for p in planned if p.route != DROP]
    dropped = list(dropped) + [s.name for p in planned if p.route == DROP for s in p.target.sources]
    seen: set[str] = set()
    for spec in (spec for p in kept for spec in p.parts):
        if spec.name in seen:
            raise FmtconvError(f"the layout maps two weights onto output tensor {spec.name!r}", file=source.path, tensor=spec.name)
        seen.add(spec.name)
    shards = assign_shards([p.parts for p in kept if p.parts], max_shard_bytes)
    return (Plan(source.path, config, dtype, kernel_backend, rounding, recipe, layout, kept, dropped, warnings, shards, source.files,
                 source.nbytes, encoder), [t.runtime_module for t in planned])


def _with_encoder(pt: PlannedTensor, recipe: Recipe, n_layers: int, default: str) -> PlannedTensor:
    """Affine re-quantizations get their rule's encoder, else the run's default."""
    if pt.route == REQUANT and pt.mode == "affine":
        rule = recipe.target_for(pt.runtime_module, pt.source_codec, quantizable=True, num_layers=n_layers)
        pt.encoder = getattr(rule, "encoder", None) or default
    return pt


def _plan_one(t: TargetTensor, runtime_module: str, recipe: Recipe, dtype: str, n_layers: int, warnings: list[str],
              layout: ModelLayout, stored: dict[str, str]) -> PlannedTensor:
    """The route, target and output parts of one tensor; rules match `runtime_module`, parts take the stored names."""
    codecs = {s.codec for s in t.sources}
    if len(codecs) != 1:
        raise FmtconvError(f"stacked sources mix codecs {sorted(codecs)}", tensor=t.name)
    codec = codecs.pop()
    shape = target_shape(t)
    module = t.module
    quantizable = t.quantizable and t.name.endswith(".weight")
    rule = recipe.target_for(runtime_module, codec, quantizable=quantizable, num_layers=n_layers, multimodal=layout.is_multimodal(t.name))
    rule_desc = "" if rule is None else f"{rule.mode} (match {rule.match!r}{', layers ' + rule.layers if rule.layers else ''})"
    if rule is not None and rule.mode == "drop":
        return PlannedTensor(t, DROP, "dense", None, None, dtype, codec, shape, [], rule_desc)
    src_st = stored.get(next(iter(t.sources[0].parts.values()))) if codec == _DENSE_CODEC else None
    if src_st in PASSTHROUGH_DTYPES:  # hash tables, ids: never decoded; held in the dtype the runtime's model has
        out_st = layout.integer_dtype(t.name, src_st)
        route = PASSTHROUGH if out_st == src_st and t.transform is None else CAST
        return PlannedTensor(t, route, "dense", None, None, stored_dtype(out_st).numpy.name, codec, shape,
                             [TensorSpec(t.name, out_st, shape)], "integer")
    if rule is None or rule.mode in ("keep", "dense"):
        out = rule.dtype if rule is not None and rule.mode == "dense" else dtype
        if (rule is None or rule.mode == "keep") and layout.keeps_source_dtype(t.name) and src_st in _ST_NAME.values():
            out = _FROM_ST_NAME[src_st]  # the runtime keeps it uncast (cast_predicate)
        route = PASSTHROUGH if (src_st == _ST_NAME[out] and t.transform is None) else CAST
        return PlannedTensor(t, route, "dense", None, None, out, codec, shape, [TensorSpec(t.name, _ST_NAME[out], shape)], rule_desc or "keep")
    bits, group = rule.bits, rule.group_size
    if shape[-1] % group:
        if rule.on_indivisible == "keep":
            warnings.append(f"{module}: input dim {shape[-1]} is not divisible by group size {group}; kept in {dtype}")
            return PlannedTensor(t, CAST, "dense", None, None, dtype, codec, shape, [TensorSpec(t.name, _ST_NAME[dtype], shape)], "keep (indivisible)")
        raise FmtconvError(f"input dimension {shape[-1]} is not divisible by group size {group} (rule match {rule.match!r}); "
                           "set on_indivisible = \"keep\" in the rule to keep such tensors dense", tensor=t.name)
    if isinstance(rule, AffineRule) and rule.exact:
        if codec != "mxfp4" or (bits, group) != (5, 32) or t.transform is not None:
            raise FmtconvError(f"the exact affine route needs an MXFP4 source and bits 5, group_size 32; this tensor is {codec} "
                               f"with bits {bits}, group_size {group}", tensor=t.name)
        route = EXACT_AFFINE
    elif rule.mode == "mxfp4" and codec == "mxfp4" and t.transform is None:
        route = REPACK
    else:
        route = REQUANT
    return PlannedTensor(t, route, rule.mode, bits, group, dtype, codec, shape,
                         parts_for(t.name, module, rule.mode, bits, group, dtype, shape), rule_desc)


__all__ = ["Plan", "PlannedTensor", "build_plan", "read_config", "compute_dtype_of", "COMPUTE_DTYPES", "FP_MODE_PARAMS",
           "DROP", "PASSTHROUGH", "CAST", "REPACK", "EXACT_AFFINE", "REQUANT"]
