"""What a bundle holds beside its weights: the config rewritten for its runtime, and the source's side files."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmtconv import __version__
from fmtconv.formats.safetensors_io import INDEX_NAME

if TYPE_CHECKING:
    from fmtconv.convert.plan import Plan

# Files of a source that the bundle must not carry over: weights, rewritten config, the source's quantization metadata
# (ModelOpt's; JANG's, which would also send vMLX down jang's own loader, vmlx_engine/utils/jang_loader.py).
_NOT_COPIED = {"config.json", INDEX_NAME, "hf_quant_config.json", "jang_config.json"}


def copy_side_files(src: Path, dst: Path, with_readme: bool = False) -> list[str]:
    """Copy every non-weight file and folder of the source (tokenizer, chat template, licence, ...)."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or p.name in _NOT_COPIED or p.suffix == ".safetensors":
            continue
        if p.name == "README.md" and not with_readme:
            continue  # the bundle gets its own model card
        target = dst / p.name
        if p.is_dir():
            shutil.copytree(p, target, dirs_exist_ok=True)
        else:
            shutil.copyfile(p, target)  # a full disk surfaces as OSError; Converter.run reports it, keeping the work
        copied.append(p.name)
    return copied


def output_config(plan: Plan) -> dict[str, Any]:
    """The source config for the runtime: MLX quantization blocks in, the source's FP8/FP4 block out."""
    config = plan.layout.output_config(dict(plan.config))
    for key in ("quantization_config", "quantization", "compression_config"):
        config.pop(key, None)
    text = config.get("text_config")
    if isinstance(text, dict):
        config["text_config"] = text = dict(text)  # the plan's source config stays as read
        text.pop("quantization_config", None)
    q = plan.quantization()
    if q:
        config["quantization"] = q
        config["quantization_config"] = q
    for c in (config, text if isinstance(text, dict) else {}):
        for key in ("torch_dtype", "dtype"):
            if key in c:
                c[key] = plan.compute_dtype
    config["fmtconv"] = {
        "version": __version__,
        "source": str(plan.source),
        "recipe": plan.recipe.name,
        "layout": plan.layout.family,
        "runtime": plan.runtime,
        "recipe_rules": plan.recipe.model_dump(mode="json")["rules"],
        "kernel_backend": plan.kernel_backend,
        "rounding": plan.rounding,
        "encoder": plan.encoder,
        "encoders": plan.encoder_patterns(),
    }
    if plan.fit is not None:
        config["fmtconv"]["fit"] = {k: plan.fit[k] for k in ("budget_bytes", "planned_bytes", "predicted_kl")}
    if plan.layout.draft_kind is not None:  # a drafter bundle (`--mtp`): how mlx-vlm runs it
        config["fmtconv"]["draft_kind"] = plan.layout.draft_kind
    return config
