"""The two models an evaluation runs, each in the bundle's runtime's own model class, and their weights by layer.

- The student is the bundle, loaded by its runtime's own `load_model(lazy=True)` (sanitize and quantization as the
  runtime applies them); its weights are lazy MLX arrays, read from the shards only when a layer needs them.
- The teacher is the same model class built from the bundle's config without quantization, holding the source decoded
  exactly by fmtconv's codecs (a keep-everything float32 plan of the bundle's layout, `rounding="exact"`), decoded one
  layer at a time.

Both are split into the text model's decoder layers (found in the module tree: the list whose length is the config's
number of layers) and the rest (embedding, final norm, head, hyper-connection head), which stays resident.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv.convert.encode import TensorEncoder
from fmtconv.convert.plan import COMPUTE_DTYPES, Plan, build_plan, num_layers_of
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.convert.runtimes import Runtime, owner_of, runtime_named
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import Checkpoint, write_safetensors

# Config keys a bundle and its source must agree on (top level or text_config).
_SHAPE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size", "moe_intermediate_size",
               "num_attention_heads", "n_routed_experts", "num_experts", "num_local_experts")
_INDEX = re.compile(r"^(?P<prefix>.+)\.(?P<i>\d+)$")


@dataclass
class TextPath:
    """Where a model's text path lives: the callable on token ids and its decoder layers."""

    text: Any  # the module called on token ids: the model, or an mlx-vlm model's language_model
    root: str  # its path prefix in the model's parameter names ("" or "language_model.")
    layers_path: str  # full path of the decoder layer list, e.g. "language_model.model.layers"
    layers: list[Any]

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}."

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a parameter belongs to, None for the text model's other parameters."""
        if not name.startswith(self.layers_path + "."):
            return None
        return int(name[len(self.layers_path) + 1 :].split(".", 1)[0])

    def in_text(self, name: str) -> bool:
        return name.startswith(self.root)


def text_path(model: Any, config: dict[str, Any]) -> TextPath:
    """The text model and its decoder layer list: the module list of `num_hidden_layers` entries under the text model."""
    n = num_layers_of(config)
    text, root = (model.language_model, "language_model.") if hasattr(model, "language_model") else (model, "")
    found: dict[str, set[int]] = {}
    for path, _ in model.named_modules():
        m = _INDEX.match(path)
        if m and path.startswith(root):
            found.setdefault(m["prefix"], set()).add(int(m["i"]))
    candidates = [p for p, idx in found.items() if idx == set(range(n))]
    if not candidates:
        raise FmtconvError(f"cannot find the {n} decoder layers of {type(model).__module__}.{type(model).__name__} "
                           "(no module list of num_hidden_layers entries under the text model)")
    layers_path = min(candidates, key=len)
    return TextPath(text, root, layers_path, list(get_submodule(model, layers_path)))


def get_submodule(module: Any, path: str) -> Any:
    """The module (or list) at a dotted path."""
    for part in path.split("."):
        module = module[int(part)] if isinstance(module, list) else module[part]
    return module


def set_submodule(root: Any, path: str, value: Any) -> None:
    """Replace the module at a dotted path (dict children and list entries alike)."""
    *parents, last = path.split(".")
    parent = get_submodule(root, ".".join(parents)) if parents else root
    if isinstance(parent, list):
        parent[int(last)] = value
    else:
        parent[last] = value


def bundle_runtime(config: dict[str, Any]) -> Runtime:
    """The runtime a bundle was written for (its fmtconv block), else the owner of its model_type."""
    name = (config.get("fmtconv") or {}).get("runtime")
    return runtime_named(name) if name else owner_of(config.get("model_type"))


def check_same_model(bundle_config: dict[str, Any], source_config: dict[str, Any], bundle: Path, source: Path) -> None:
    """The bundle was made from a checkpoint of this shape: model_type and the dimensions agree."""
    def value(c: dict[str, Any], k: str) -> Any:
        return c.get(k, (c.get("text_config") or {}).get(k))

    diffs = [f"{k}: bundle {value(bundle_config, k)!r}, source {value(source_config, k)!r}" for k in _SHAPE_KEYS
             if value(bundle_config, k) != value(source_config, k)]
    if diffs:
        raise FmtconvError(f"the bundle does not match the source {source}: " + "; ".join(diffs), file=bundle / "config.json")


def teacher_config(bundle_config: dict[str, Any]) -> dict[str, Any]:
    """The bundle's config without quantization, in float32: what the teacher's model class is built from."""
    config = json.loads(json.dumps(bundle_config))
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    for c in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if key in c:
                c[key] = "float32"
    return config


def build_skeleton(runtime: Runtime, config: dict[str, Any]) -> Any:
    """The runtime's model class built by its own loader from `config`, with no weights (lazily initialised)."""
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # mlx-vlm warns that a skeleton without weights has none for its vision tower
    try:
        with tempfile.TemporaryDirectory(prefix="fmtconv-eval-") as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            write_safetensors(Path(tmp) / "model.safetensors", {})
            model, _ = runtime.load_lazily(Path(tmp))
    finally:
        root.setLevel(level)
    return model


class TeacherWeights:
    """The source, decoded exactly into float32 in the runtime's parameter names, one layer at a time."""

    def __init__(self, source: Path, bundle_config: dict[str, Any], runtime: Runtime):
        prov = bundle_config.get("fmtconv") or {}
        keep = recipe_from_dict({"name": "teacher", "rules": [{"mode": "keep"}]})
        self.plan: Plan = build_plan(source, keep, compute_dtype="float32", rounding="exact", family=prov.get("layout"),
                                     runtime=runtime.name)
        self.encoder = TensorEncoder(self.plan)
        self.ck = Checkpoint(source)
        layout = self.plan.layout
        self.by_name = {layout.runtime_name(pt.target.name): pt for pt in self.plan.tensors}

    def close(self) -> None:
        self.ck.close()

    def names(self) -> set[str]:
        return set(self.by_name)

    def arrays(self, names: Iterable[str]) -> list[tuple[str, Any]]:
        """(runtime name, float32 MLX array) for each name; integer tensors in the integer dtype the runtime holds."""
        import mlx.core as mx

        out = []
        for name in names:
            pt = self.by_name[name]
            (value,) = self.encoder.encode_tensor(self.ck, pt).values()
            if value.dtype.kind == "f" or value.dtype == np.dtype(COMPUTE_DTYPES["bfloat16"]):
                value = value.astype(np.float32)  # exact widening (a tensor the runtime keeps in its stored dtype)
            out.append((name, mx.array(value)))
        self.ck.release_all()  # a layer decoded: none of the source's pages need stay mapped
        return out


def check_names(teacher: TeacherWeights, params: dict[str, Any], path: TextPath, bundle: Path) -> None:
    """The decoded source names exactly the text model's parameters of the teacher, shape for shape."""
    want = {k: tuple(v.shape) for k, v in params.items() if path.in_text(k)}
    have = {k: tuple(teacher.by_name[k].shape) for k in teacher.names() if path.in_text(k)}
    problems = [f"the model has {k} {want[k]} but the source gives none" for k in sorted(set(want) - set(have))]
    problems += [f"the source gives {k} but the model has no such parameter" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: the source gives shape {have[k]}, the model expects {want[k]}"
                 for k in sorted(set(want) & set(have)) if want[k] != have[k]]
    if problems:
        shown = "; ".join(problems[:10]) + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
        raise FmtconvError(f"the source does not decode into the bundle's model: {shown}", file=bundle / "config.json")


class TeacherModel:
    """The teacher: the runtime's model class built from `config` without quantization, its decoded source weights
    loaded one decoder layer at a time (the rest of the text model stays resident once `load_outer` ran)."""

    def __init__(self, source: Path, config: dict[str, Any], runtime: Runtime, where: Path):
        from mlx.utils import tree_flatten

        self.model = build_skeleton(runtime, teacher_config(config))
        self.path = text_path(self.model, config)
        self.weights = TeacherWeights(source, config, runtime)
        try:
            check_names(self.weights, dict(tree_flatten(self.model.parameters())), self.path, where)
        except BaseException:
            self.weights.close()
            raise
        self.by_layer: dict[int | None, list[str]] = {}
        for n in sorted(self.weights.names()):
            if self.path.in_text(n):
                self.by_layer.setdefault(self.path.layer_of(n), []).append(n)

    def close(self) -> None:
        self.weights.close()

    def _load(self, names: list[str]) -> None:
        """Decode and install these weights (only they are evaluated: the skeleton's own initial values, never
        evaluated, cost nothing, and evaluating them would allocate every layer)."""
        import mlx.core as mx

        arrays = self.weights.arrays(names)
        self.model.load_weights(arrays, strict=False)
        mx.eval([a for _, a in arrays])

    def load_outer(self) -> None:
        self._load(self.by_layer.get(None, []))

    def load_all(self) -> None:
        self._load([n for names in self.by_layer.values() for n in names])

    def load_layer(self, i: int) -> Any:
        """Decode and load layer i; returns what `release_layer` needs to drop it again."""
        saved = self.path.layers[i].parameters()
        self._load(self.by_layer.get(i, []))
        return saved

    def release_layer(self, i: int, saved: Any) -> None:
        import mlx.core as mx

        self.path.layers[i].update(saved, strict=False)
        mx.clear_cache()
