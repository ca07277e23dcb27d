"""Model layouts: per release family and runtime, checkpoint names -> the runtime model's post-sanitize module paths."""

from __future__ import annotations

import importlib
from typing import Any

from fmtconv.convert.layouts.base import ModelLayout, TargetTensor
from fmtconv.convert.layouts.generic import GenericLayout
from fmtconv.convert.layouts.mlx_vlm_wrapped import MlxVlmWrapped
from fmtconv.convert.runtimes import owner_of, runtime_named
from fmtconv.errors import FmtconvError

# One module per family and runtime; each defines one ModelLayout subclass with its model_types.
_FAMILY_MODULES = ("deepseek_v4", "deepseek_v4_vmlx", "deepseek_v41", "deepseek_v3", "gpt_oss", "step3p7", "step3p5", "glm4_moe_lite", "qwen3_moe")
# Releases with a trained MTP layer (`--mtp`): main layout family -> (release, the drafter model_type of the runtime
# that runs it, mlx-vlm's speculative/drafters), and fmtconv's drafter layout module per drafter model_type.
DRAFTERS = {"deepseek_v4": ("DeepSeek-V4-Flash", "deepseek_v4_mtp"), "glm4_moe_lite": ("GLM-4.7-Flash", "glm4_moe_lite_mtp")}
_DRAFTER_LAYOUTS = {"deepseek_v4_mtp": "deepseek_v4_mtp", "glm4_moe_lite_mtp": "glm4_moe_lite_mtp"}
_DRAFTER_RUNTIME = "mlx-vlm"


def all_layouts() -> list[type[ModelLayout]]:
    """Every family layout class (the generic fallback last)."""
    found: list[type[ModelLayout]] = []
    for mod_name in _FAMILY_MODULES:
        try:
            mod = importlib.import_module(f"fmtconv.convert.layouts.{mod_name}")
        except ModuleNotFoundError as e:
            if e.name == f"fmtconv.convert.layouts.{mod_name}":
                continue
            raise
        for obj in vars(mod).values():
            if isinstance(obj, type) and issubclass(obj, ModelLayout) and obj is not ModelLayout and obj.model_types:
                if obj not in found:
                    found.append(obj)
    return found + [GenericLayout]


def layout_for(config: dict[str, Any], family: str | None = None, runtime: str | None = None) -> ModelLayout:
    """The layout for a config's model_type (or an explicit family), written for `runtime`.

    The runtime defaults to the one that owns the model_type (fmtconv.convert.runtimes.owner_of), or the
    family's own.  An mlx-lm layout serves mlx-vlm through mlx-vlm's `language_model.` wrapper.
    """
    model_type = config.get("model_type")
    if runtime is not None:
        runtime_named(runtime)
    if family is not None:
        candidates = [c for c in all_layouts() if c.family == family]
        if not candidates:
            names = ", ".join(c.family for c in all_layouts())
            raise FmtconvError(f"unknown layout family {family!r} (known: {names})")
    else:
        candidates = [c for c in all_layouts() if model_type in c.model_types]
        if not candidates:
            return _for_runtime(GenericLayout, runtime or owner_of(model_type).name, model_type)
    want = runtime or (candidates[0].runtime if family is not None else owner_of(model_type).name)
    same = [c for c in candidates if c.runtime == want]
    return same[0]() if same else _for_runtime(candidates[0], want, model_type)


def drafter_layout_for(main: ModelLayout) -> ModelLayout:
    """The drafter bundle's layout for the MTP layer of `main`'s release (`--mtp`).

    Refused, before anything is read or written, for a family without a drafter, and where the runtime has no
    drafter model class to load and check the bundle with (detected in the installed runtime, not assumed from its
    version; without the runtime installed there is no telling, and nothing to run the drafter with).
    """
    if main.family not in DRAFTERS:
        have = ", ".join(f"{release} ({family})" for family, (release, _) in DRAFTERS.items())
        raise FmtconvError(f"--mtp: the {main.family} layout has no drafter for its MTP layer; the families with one are {have}")
    release, drafter = DRAFTERS[main.family]
    runtime = runtime_named(_DRAFTER_RUNTIME)
    if not runtime.installed():
        raise FmtconvError(f"--mtp: the {release} drafter bundle is for {runtime.name}'s {drafter} drafter model, and "
                           f"{runtime.name} is not installed to check it against (pip install {runtime.name})")
    if not runtime.has_model_class(drafter):
        raise FmtconvError(f"--mtp: {runtime.name} {runtime.version()} has no {drafter} drafter model "
                           f"(mlx_vlm.speculative.drafters.{drafter} defines no Model class), so a {release} drafter "
                           "bundle could not be loaded, checked or run; nothing was written")
    layout = drafter_layout_named(drafter)
    assert layout is not None, drafter  # every drafter in DRAFTERS has its layout module
    return layout


def drafter_layout_named(model_type: Any) -> ModelLayout | None:
    """fmtconv's layout for a drafter model_type (e.g. deepseek_v4_mtp), None for any other model_type."""
    if not isinstance(model_type, str) or model_type not in _DRAFTER_LAYOUTS:
        return None
    mod = importlib.import_module(f"fmtconv.convert.layouts.{_DRAFTER_LAYOUTS[model_type]}")
    return next(obj() for obj in vars(mod).values()
                if isinstance(obj, type) and issubclass(obj, ModelLayout) and model_type in obj.model_types)


def _for_runtime(cls: type[ModelLayout], runtime: str, model_type: Any) -> ModelLayout:
    if cls.runtime == runtime:
        return cls()
    if cls.runtime == "mlx-lm" and runtime == "mlx-vlm" and cls.mlx_vlm_wraps:
        return MlxVlmWrapped(cls())
    served = sorted({m for c in all_layouts() if c.runtime == runtime for m in c.model_types})
    if served and runtime not in ("mlx-lm", "mlx-vlm"):
        why = f"fmtconv writes {runtime} bundles only for model_type {', '.join(served)}"
    else:
        why = f"its {cls.family} layout is written for {cls.runtime}'s module tree, which {runtime}'s model does not share"
    raise FmtconvError(f"fmtconv has no {runtime} layout for model_type {model_type!r}: {why}; "
                       f"{model_type!r} is loaded by {runtimes_for(model_type, cls)}")


def runtimes_for(model_type: Any, cls: type[ModelLayout] | None = None) -> str:
    """The runtimes fmtconv writes a model_type for, the owner (the default) first: "mlx-lm (the default) or mlx-vlm"."""
    classes = [c for c in all_layouts() if model_type in c.model_types] or [cls or GenericLayout]
    names = [c.runtime for c in classes] + ["mlx-vlm" for c in classes if c.runtime == "mlx-lm" and c.mlx_vlm_wraps]
    owner = owner_of(model_type).name
    ordered = [owner] + sorted(set(names) - {owner})
    return " or ".join(f"{n} (the default)" if n == owner else f"{n} (--runtime {n})" for n in ordered)


def bundle_layout(config: dict[str, Any]) -> ModelLayout:
    """The layout a bundle was written with (config.json's fmtconv record: layout and runtime; a drafter's by its
    model_type), else its model_type owner's."""
    drafter = drafter_layout_named(config.get("model_type"))
    if drafter is not None:
        return drafter
    prov = config.get("fmtconv") if isinstance(config.get("fmtconv"), dict) else {}
    family, runtime = (v if isinstance(v, str) else None for v in (prov.get("layout"), prov.get("runtime")))
    try:
        return layout_for(config, family, runtime)
    except FmtconvError:
        return GenericLayout()


__all__ = ["DRAFTERS", "ModelLayout", "TargetTensor", "GenericLayout", "MlxVlmWrapped", "all_layouts", "bundle_layout",
           "drafter_layout_for", "drafter_layout_named", "layout_for", "runtimes_for"]
