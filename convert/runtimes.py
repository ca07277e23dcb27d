"""The MLX runtimes a bundle is written for, which one owns each model_type, and their loaders.

A runtime is the Python package whose `models.<model_type>` module holds the model class that
loads the bundle.  Ownership follows ../shared/releases/README.md (mlx-lm 0.32.2, mlx-vlm 0.7.10):
`deepseek_v4` and `step3p7` exist only in mlx-vlm; mlx-lm owns every other model type fmtconv
knows (mlx-vlm wraps several of them too, under `language_model.`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fmtconv.errors import FmtconvError

# model_type -> the runtime that owns it, where that is not mlx-lm (shared/releases/README.md).
_OWNERS = {"deepseek_v4": "mlx-vlm", "step3p7": "mlx-vlm"}
# Where mlx-vlm looks for a model_type's module, in order (mlx_vlm.utils.get_model_and_args).
_VLM_MODEL_PACKAGES = ("models", "speculative.drafters")


@dataclass(frozen=True)
class Runtime:
    """One MLX runtime package: `mlx-lm` (import `mlx_lm`) or `mlx-vlm` (import `mlx_vlm`)."""

    name: str
    package: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.package) is not None

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def model_type(self, config: dict[str, Any]) -> str:
        """The model module name the runtime picks for a config (its own remapping where installed)."""
        model_type = str(config.get("model_type"))
        if not self.installed():
            return model_type
        if self.package == "mlx_lm":
            from mlx_lm.utils import MODEL_REMAPPING

            return MODEL_REMAPPING.get(model_type, model_type)
        from mlx_vlm.utils import get_model_type

        return get_model_type(dict(config)) or model_type

    def model_module(self, config: dict[str, Any]) -> str:
        """The module that holds the model class; mlx-vlm also looks among its speculative drafters
        (mlx_vlm.utils.get_model_and_args: `models.X`, then `speculative.drafters.X`)."""
        model_type = self.model_type(config)
        if self.package == "mlx_vlm" and self.installed():
            for pkg in _VLM_MODEL_PACKAGES:
                if importlib.util.find_spec(f"mlx_vlm.{pkg}.{model_type}") is not None:
                    return f"mlx_vlm.{pkg}.{model_type}"
        return f"{self.package}.models.{model_type}"

    def has_model(self, config: dict[str, Any]) -> bool:
        """Whether this runtime is installed and has a model module for the config's model_type."""
        return self.installed() and importlib.util.find_spec(self.model_module(config)) is not None

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
            if self.package == "mlx_lm":
                from mlx_lm.utils import load_model

                model, _ = load_model(Path(bundle), lazy=True, strict=True)
            else:
                from mlx_vlm.utils import load_model

                model = load_model(Path(bundle), lazy=True)
        mine = [w for m, w in calls if m is model]
        if not mine:
            raise FmtconvError(f"{self.name}'s loader returned without loading weights into its model", file=bundle)
        return model, mine[-1]


RUNTIMES = {r.name: r for r in (Runtime("mlx-lm", "mlx_lm"), Runtime("mlx-vlm", "mlx_vlm"))}


def runtime_named(name: str) -> Runtime:
    try:
        return RUNTIMES[name]
    except KeyError:
        raise FmtconvError(f"--runtime {name!r} is not one of {', '.join(RUNTIMES)}") from None


def owner_of(model_type: str | None) -> Runtime:
    """The runtime that owns a model_type: the only released MLX package with that model, else mlx-lm."""
    return RUNTIMES[_OWNERS.get(str(model_type), "mlx-lm")]


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
