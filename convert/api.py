"""The converter as a library call: plan, then run the pipeline into OUT."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmtconv.convert.plan import Plan, build_plan
from fmtconv.convert.recipes import Recipe, load_recipe
from fmtconv.errors import FmtconvError
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


def eval_tokens(
    model_dir: str | Path,
    tokenizer_dirs: list[str | Path],
    *,
    tokens: str | Path | None = None,
    text: str | Path | None = None,
    n_tokens: int = 512,
    seq_len: int = 512,
):
    """The token batch an evaluation runs on (checked against model_dir's vocabulary): --tokens, --text, or the
    calibration text, tokenized by the first of tokenizer_dirs that has a tokenizer."""
    from fmtconv.convert.check.eval import token_batch
    from fmtconv.convert.plan import read_config

    config = read_config(Path(model_dir))
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise FmtconvError("has no integer vocab_size (top level or text_config)", file=Path(model_dir) / "config.json")
    return token_batch(tokens_file=Path(tokens) if tokens else None, text_file=Path(text) if text else None,
                       tokenizer_dirs=[Path(d) for d in tokenizer_dirs], vocab_size=vocab, n_tokens=n_tokens, seq_len=seq_len)


def evaluate(
    out: str | Path,
    src: str | Path,
    *,
    tokens: str | Path | None = None,
    text: str | Path | None = None,
    n_tokens: int = 512,
    seq_len: int = 512,
    batch=None,
    student_float32: bool = False,
    quiet: bool = True,
    record: bool = True,
):
    """The bundle OUT against its exact source SRC at the model level (fmtconv.convert.check.eval): KL, top-k, perplexity,
    per-layer errors, streamed layer by layer, on `batch` (else the tokens `eval_tokens` gives).  With `record`, the
    report is kept in OUT (fmtconv-eval.json) and the model card gets its summary; a read-only OUT is evaluated all the
    same, with a warning."""
    import warnings

    from fmtconv.convert.check.eval import evaluate as run_eval
    from fmtconv.convert.check.eval import write_report

    out, src = Path(out), Path(src)
    if batch is None:
        batch = eval_tokens(out, [out, src], tokens=tokens, text=text, n_tokens=n_tokens, seq_len=seq_len)
    if not quiet and sys.stderr.isatty():
        from fmtconv.convert.progress import StageProgress

        with StageProgress(f"evaluating {out.name}") as bar:
            report = run_eval(out, src, batch, student_float32=student_float32, progress=bar.update)
    else:
        report = run_eval(out, src, batch, student_float32=student_float32)
    if record:
        try:
            write_report(out, report)
            from fmtconv.convert.publish.model_card import README, is_fmtconv_card, write_model_card

            if not (out / README).exists() or is_fmtconv_card(out):
                write_model_card(out)
        except OSError as e:
            warnings.warn(f"the evaluation was not recorded in {out} ({e.strerror})", RuntimeWarning, stacklevel=2)
    return report
