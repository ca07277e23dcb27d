"""The converter as a library call: plan, then run the pipeline into OUT."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmtconv.convert.plan import Plan, build_plan
from fmtconv.convert.recipes import Recipe, load_recipe
from fmtconv.formats.safetensors_io import DEFAULT_SHARD_BYTES


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def plan(
    src: str | Path,
    recipe: str | Path | Recipe = "q4q8",
    *,
    compute_dtype: str | None = None,
    kernel_backend: str = "metal",
    rounding: str = "mlx-lm",
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    encoder: str = "minmax",
    runtime: str | None = None,
) -> Plan:
    """The conversion plan, nothing written (`runtime`: mlx-lm / mlx-vlm; default, the one that owns the model_type;
    `encoder`: the affine encoder of rules that name none, "minmax" | "mse")."""
    return build_plan(src, resolve_recipe(recipe), compute_dtype=compute_dtype, kernel_backend=kernel_backend,
                      rounding=rounding, family=family, max_shard_bytes=max_shard_bytes, runtime=runtime, encoder=encoder)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    recipe: str | Path | Recipe = "q4q8",
    compute_dtype: str | None = None,
    kernel_backend: str = "metal",
    rounding: str = "mlx-lm",
    family: str | None = None,
    runtime: str | None = None,
    overwrite: bool = False,
    quiet: bool = True,
    workers: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    model_card: bool = True,
    progress: Callable[[int, int], None] | None = None,
    encoder: str = "minmax",
) -> dict[str, Any]:
    """Convert SRC into an MLX bundle at OUT; returns the run summary. Resumes an interrupted run."""
    from fmtconv.convert.pipeline import Converter, check_out_path

    check_out_path(Path(src), Path(out), overwrite)
    p = plan(src, recipe, compute_dtype=compute_dtype, kernel_backend=kernel_backend, rounding=rounding,
             family=family, max_shard_bytes=max_shard_bytes, runtime=runtime, encoder=encoder)
    extra = _model_card_writer(p) if model_card else None
    if progress is None and not quiet and sys.stderr.isatty():
        from fmtconv.convert.progress import RichProgress

        with RichProgress(p.total_bytes, len(p.tensors), f"converting {Path(src).name}") as bar:
            return Converter(p, Path(out), workers=workers, progress=bar.update,
                             tensor_progress=bar.update_tensors).run(overwrite=overwrite, extra_files=extra)
    return Converter(p, Path(out), workers=workers, progress=progress).run(overwrite=overwrite, extra_files=extra)


def _model_card_writer(p: Plan) -> Callable[[Path], None]:
    def write(partial: Path) -> None:
        from fmtconv.convert.publish.model_card import write_model_card

        write_model_card(partial, p)

    return write
