"""The MLX runtimes a bundle is written for, which one owns each model_type, their lazy loaders and text paths.

A runtime is the Python package users install to run the bundle, and the model class its loader builds.
Ownership follows ../shared/releases/README.md (mlx-lm 0.32.2, mlx-vlm 0.7.10): `deepseek_v4` and `step3p7`
exist only in mlx-vlm; mlx-lm owns every other model type fmtconv knows (mlx-vlm wraps several of them too,
under `language_model.`).  vMLX (PyPI `vmlx` 1.6.81) runs `deepseek_v4` with jang 2.5.50's model class,
which it installs as `mlx_lm.models.deepseek_v4` and loads through mlx-lm 0.31.x's `load_model`; it is
chosen with `--runtime vmlx`, never by default.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from fmtconv.errors import FmtconvError

# model_type -> the runtime that owns it, where that is not mlx-lm (shared/releases/README.md).
_OWNERS = {"deepseek_v4": "mlx-vlm", "step3p7": "mlx-vlm"}
# Where mlx-vlm looks for a model_type's module, in order (mlx_vlm.utils.get_model_and_args).
_VLM_MODEL_PACKAGES = ("models", "speculative.drafters")


@dataclass(frozen=True)
class Runtime:
    """One MLX runtime: its PyPI name and the import name of its package."""

    name: str
    package: str

    def installed(self) -> bool:
        """Whether the packages its loader imports are importable (nothing is imported here)."""
        return not self.missing()

    def missing(self) -> list[str]:
        """The packages its loader imports that are not importable."""
        return [p for p in self.loader_packages() if not _found(p)]

    def loader_packages(self) -> tuple[str, ...]:
        return (self.package,)

    def version(self) -> str | None:
        return _version(self.name)

    def model_type(self, config: dict[str, Any]) -> str:
        """The model module name the runtime picks for a config (its own remapping where installed)."""
        return str(config.get("model_type"))

    def model_module(self, config: dict[str, Any]) -> str:
        """The module that holds the model class."""
        return f"{self.package}.models.{self.model_type(config)}"

    def has_model(self, config: dict[str, Any]) -> bool:
        """Whether this runtime is installed and has a model module for the config's model_type."""
        return self.installed() and _found(self.model_module(config))

    def has_model_class(self, model_type: str) -> bool:
        """Whether the runtime's module for `model_type` defines the `Model` class its loader builds (a module can
        exist with only a config, as mlx-vlm 0.7.10's glm4_moe_lite_mtp drafter does)."""
        config = {"model_type": model_type}
        if not self.has_model(config):
            return False
        return hasattr(importlib.import_module(self.model_module(config)), "Model")

    def load_lazily(self, bundle: Path) -> tuple[Any, dict[str, Any]]:
        """The runtime's own `load_model(bundle, lazy=True)`, stopped before it installs the weights.

        Returns (model, weights): the model exactly as the loader built and quantized it, and the
        sanitized weights it was about to load (lazy MLX arrays: nothing is read or allocated).
        """
        with _recording_load_weights() as calls:
            model = self._load_model(Path(bundle))
        mine = [w for m, w in calls if m is model]
        if not mine:
            raise FmtconvError(f"{self.name}'s loader returned without loading weights into its model", file=bundle)
        return model, mine[-1]

    def _load_model(self, bundle: Path) -> Any:
        raise FmtconvError(f"fmtconv does not know how {self.name} loads a bundle", file=bundle)

    def text_model(self, model: Any) -> Any:
        """The module that maps token ids to logits: an mlx-vlm model's `language_model`, else the model."""
        return getattr(model, "language_model", model)

    def sequence_logits(self, model: Any, ids: Any) -> Any:
        """Float logits [B, L, V] for every position of the token ids [B, L], through the model's text path."""
        out = self.text_model(model)(ids)
        return getattr(out, "logits", out)


@dataclass(frozen=True)
class MlxLm(Runtime):
    """mlx-lm: `mlx_lm.utils.load_model`, its MODEL_REMAPPING."""

    def model_type(self, config: dict[str, Any]) -> str:
        model_type = str(config.get("model_type"))
        if not self.installed():
            return model_type
        from mlx_lm.utils import MODEL_REMAPPING

        return MODEL_REMAPPING.get(model_type, model_type)

    def _load_model(self, bundle: Path) -> Any:
        from mlx_lm.utils import load_model

        return load_model(bundle, lazy=True, strict=True)[0]


@dataclass(frozen=True)
class MlxVlm(Runtime):
    """mlx-vlm: `mlx_vlm.utils.load_model`, its get_model_type."""

    def model_type(self, config: dict[str, Any]) -> str:
        model_type = str(config.get("model_type"))
        if not self.installed():
            return model_type
        from mlx_vlm.utils import get_model_type

        return get_model_type(dict(config)) or model_type

    def model_module(self, config: dict[str, Any]) -> str:
        """mlx_vlm.utils.get_model_and_args: `models.X`, then its speculative drafters, `speculative.drafters.X`."""
        model_type = self.model_type(config)
        if self.installed():
            for pkg in _VLM_MODEL_PACKAGES:
                if _found(f"mlx_vlm.{pkg}.{model_type}"):  # an mlx-vlm without that package: not a traceback
                    return f"mlx_vlm.{pkg}.{model_type}"
        return super().model_module(config)

    def _load_model(self, bundle: Path) -> Any:
        from mlx_vlm.utils import load_model

        return load_model(bundle, lazy=True)


@dataclass(frozen=True)
class Vmlx(Runtime):
    """vMLX: jang's model class, registered by `jang_tools.dsv4.mlx_register`, loaded by mlx-lm's `load_model`.

    vmlx_engine/utils/tokenizer.py `load_model_with_fallback` imports the register module, then (no
    jang_config.json in the bundle) calls plain `mlx_lm.load`.  fmtconv runs the same two steps and never
    imports vmlx_engine itself: importing it rewrites files of the installed mlx-lm in place.
    """

    # model_type -> jang's model module that vMLX runs for it (registered as mlx_lm.models.<model_type>).
    MODELS: ClassVar[dict[str, str]] = {"deepseek_v4": "jang_tools.dsv4.mlx_model"}
    REGISTER: ClassVar[dict[str, str]] = {"deepseek_v4": "jang_tools.dsv4.mlx_register"}

    def loader_packages(self) -> tuple[str, ...]:
        return ("jang_tools", "mlx_lm")

    def version(self) -> str | None:
        vmlx, jang = _version(self.name), _version("jang")
        if jang is None:
            return vmlx
        return f"{vmlx} (jang {jang})" if vmlx else f"jang {jang}"

    def model_module(self, config: dict[str, Any]) -> str:
        model_type = self.model_type(config)
        return self.MODELS.get(model_type, f"jang_tools.<no model for {model_type}>")

    def has_model(self, config: dict[str, Any]) -> bool:
        # Not find_spec on the model module: that imports jang_tools.dsv4, whose __init__ registers the model.
        return self.model_type(config) in self.MODELS and self.installed()

    def _load_model(self, bundle: Path) -> Any:
        model_type = self.model_type(json.loads((bundle / "config.json").read_text()))
        if model_type not in self.REGISTER:
            raise FmtconvError(f"vMLX has no model for model_type {model_type!r} (only {', '.join(self.REGISTER)})", file=bundle)
        importlib.import_module(self.REGISTER[model_type])  # installs mlx_lm.models.<model_type>
        from mlx_lm.utils import load_model

        return load_model(bundle, lazy=True, strict=True)[0]

    def sequence_logits(self, model: Any, ids: Any) -> Any:
        """Every position's logits: jang's Model.__call__ keeps only the last position when L > 1, so run its inner
        model (embedding, hyper-connection copies, each decoder layer object of `model.model.layers` in order,
        head reduction, norm) and then its head as Model.__call__ does for one position."""
        return _jang_head(model.lm_head, model.model(ids))


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (MlxLm("mlx-lm", "mlx_lm"), MlxVlm("mlx-vlm", "mlx_vlm"), Vmlx("vmlx", "vmlx_engine"))}


def runtime_named(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise FmtconvError(f"--runtime {name!r} is not one of {', '.join(RUNTIMES)}") from None


def owner_of(model_type: str | None) -> Runtime:
    """The runtime that owns a model_type: the only released MLX package with that model, else mlx-lm."""
    return RUNTIMES[_OWNERS.get(str(model_type), "mlx-lm")]


def _jang_head(lm_head: Any, h: Any) -> Any:
    """jang_tools/dsv4/mlx_model.py Model.__call__: the head in float32 (a quantized head dequantized first)."""
    import mlx.core as mx

    if "scales" in lm_head:
        w = mx.dequantize(lm_head["weight"], lm_head["scales"], lm_head.get("biases"), group_size=lm_head.group_size,
                          bits=lm_head.bits, mode=getattr(lm_head, "mode", "affine"))
    else:
        w = lm_head["weight"]
    return h.astype(mx.float32) @ w.astype(mx.float32).T


def _found(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextmanager
def _recording_load_weights() -> Iterator[list[tuple[Any, dict[str, Any]]]]:
    """Within the block, `nn.Module.load_weights` records (module, weights) instead of loading."""
    import mlx.nn as nn

    calls: list[tuple[Any, dict[str, Any]]] = []
    original = nn.Module.load_weights

    def record(self, file_or_weights, strict: bool = True):
        calls.append((self, dict(file_or_weights)))
        return self

    nn.Module.load_weights = record
    try:
        yield calls
    finally:
        nn.Module.load_weights = original
