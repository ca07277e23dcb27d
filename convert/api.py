"""The converter as a library call: plan, then run the pipeline into OUT."""

from __future__ import annotations

import dataclasses
import shutil
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
    recipe: str | Path | Recipe | None = None,
    *,
    compute_dtype: str | None = None,
    kernel_backend: str = "metal",
    rounding: str = "mlx-lm",
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    encoder: str = "minmax",
    runtime: str | None = None,
    mtp: bool = False,
    group_size: int | None = None,
    fit: int | None = None,
    target_bpw: float | None = None,
    fit_tokens: Any = None,
    fit_cache: str | Path | None = None,
    fit_progress: Callable[[str, int, int], None] | None = None,
) -> Plan:
    """The conversion plan, nothing written (`recipe`: a preset name, a TOML file or a Recipe; None: q4q8, or with a
    budget no constraints; `runtime`: mlx-lm / mlx-vlm / vmlx; default, the one that owns the model_type;
    `encoder`: the affine encoder of rules that name none, "minmax" | "mse"; `mtp`: also the drafter bundle of the
    release's MTP layer, as `Plan.drafter`, counted in `Plan.bytes_with_drafter`; `group_size`: every affine rule's group).

    `fit` (bytes of weight shards, the drafter's included) or `target_bpw`: the recipe is the allocation with the least
    predicted KL within that budget (fmtconv.convert.fit), measured on `fit_tokens` (default: the calibration text, as
    `fmtconv eval`), cached beside the source or in `fit_cache`; `recipe`, if given, pins what its rules match.
    """
    if fit is None and target_bpw is None:
        r = resolve_recipe(recipe if recipe is not None else "q4q8")
        return build_plan(src, with_group_size(r, group_size), compute_dtype=compute_dtype, kernel_backend=kernel_backend,
                          rounding=rounding, family=family, max_shard_bytes=max_shard_bytes, runtime=runtime, encoder=encoder,
                          mtp=mtp)
    from fmtconv.convert.fit.allocate import DRAFTER_TAIL, budget_for_bpw, fit_recipe

    if fit is not None and target_bpw is not None:
        raise FmtconvError("give --fit SIZE or --target-bpw X, not both")
    constraints = with_group_size(resolve_recipe(recipe), group_size) if recipe is not None else None
    settings = {"compute_dtype": compute_dtype, "kernel_backend": kernel_backend, "rounding": rounding, "family": family,
                "runtime": runtime}
    if target_bpw is not None and not target_bpw > 0:
        raise FmtconvError(f"--target-bpw must be positive, got {target_bpw}")
    extra, budget = 0, fit
    if mtp or target_bpw is not None:  # the drafter's bytes, or every parameter, come from a plan of the constraints
        base = build_plan(src, _tail(constraints), max_shard_bytes=max_shard_bytes, mtp=mtp, **settings)
        extra = base.drafter.total_bytes if base.drafter is not None else 0
        if target_bpw is not None:
            budget = budget_for_bpw(base.total_params + (base.drafter.total_params if base.drafter else 0), target_bpw)
    budget = int(budget)
    tokens = fit_tokens if fit_tokens is not None else eval_tokens(src, [src])
    result = fit_recipe(src, budget, tokens=tokens, constraints=constraints, cache_dir=fit_cache, extra_bytes=extra,
                        progress=fit_progress, **settings)
    tail = [r.model_dump(mode="json", exclude_none=True) for r in result.recipe.rules] + (DRAFTER_TAIL if mtp else [])
    fitted = Recipe.model_validate({**result.recipe.model_dump(mode="json"), "rules": tail})
    result = dataclasses.replace(result, recipe=fitted)  # fit-recipe.toml reproduces the drafter's targets too
    p = build_plan(src, fitted, max_shard_bytes=max_shard_bytes, encoder=encoder, mtp=mtp, **settings)
    if p.bytes_with_drafter > budget:  # the allocation counts exactly what the plan writes: this would be a bug
        raise FmtconvError(f"internal error: the fitted plan takes {p.bytes_with_drafter} bytes, over the budget of {budget}")
    p.fit = {**result.to_json(), "recipe_toml": result.toml()}
    return p


def _tail(constraints: Recipe | None) -> Recipe:
    """The constraint rules, then the drafter's default: what the modules no allocation unit holds get."""
    from fmtconv.convert.fit.allocate import DRAFTER_TAIL

    rules = [r.model_dump(mode="json", exclude_none=True) for r in constraints.rules] if constraints else []
    return Recipe.model_validate({"name": "fit constraints", "rules": rules + DRAFTER_TAIL})


def with_group_size(recipe: Recipe, group_size: int | None) -> Recipe:
    """The recipe with every affine rule at `group_size` (--group-size on a preset; the lossless MXFP4 route keeps its
    group of 32); unchanged for None."""
    if group_size is None:
        return recipe
    rules = [{**r.model_dump(mode="json", exclude_none=True),
              **({"group_size": group_size} if r.mode == "affine" and not r.exact else {})}  # exact: MXFP4's own group 32
             for r in recipe.rules]
    return Recipe.model_validate({**recipe.model_dump(mode="json"), "name": f"{recipe.name} (group {group_size})",
                                  "rules": rules})


def drafter_out(out: str | Path, mtp_out: str | Path | None = None) -> Path:
    """Where `--mtp` writes the drafter bundle: `mtp_out`, else OUT-mtp next to OUT."""
    return Path(mtp_out) if mtp_out is not None else Path(out).with_name(Path(out).name + "-mtp")


def convert(
    src: str | Path,
    out: str | Path,
    *,
    recipe: str | Path | Recipe | None = None,
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
    mtp: bool = False,
    mtp_out: str | Path | None = None,
    group_size: int | None = None,
    fit: int | None = None,
    target_bpw: float | None = None,
    fit_tokens: Any = None,
    fit_cache: str | Path | None = None,
    fit_progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Convert SRC into an MLX bundle at OUT; returns the run summary. Resumes an interrupted run.

    `mtp`: also write the drafter bundle of the release's MTP layer, for speculative decoding, to `mtp_out` (default
    OUT-mtp), through the same plan, recipe and checks; the summary's "drafter" entry describes it.  Both bundles are
    checked before either is written, and both are renamed into place only once both are complete.

    `fit` / `target_bpw` (with `recipe` as constraints, or None): as `plan`; the allocation is written into OUT as
    fit-recipe.toml and summarised in the model card.
    """
    from fmtconv.convert.pipeline import check_out_path

    check_out_path(Path(src), Path(out), overwrite)
    draft = drafter_out(out, mtp_out) if mtp else None
    if draft is not None:
        check_out_path(Path(src), draft, overwrite)
        _check_apart(Path(out), draft)
    p = plan(src, recipe, compute_dtype=compute_dtype, kernel_backend=kernel_backend, rounding=rounding,
             family=family, max_shard_bytes=max_shard_bytes, runtime=runtime, encoder=encoder, mtp=mtp, group_size=group_size,
             fit=fit, target_bpw=target_bpw, fit_tokens=fit_tokens, fit_cache=fit_cache, fit_progress=fit_progress)
    bundles = [(p.drafter, draft)] if p.drafter is not None and draft is not None else []
    bundles.append((p, Path(out)))  # the drafter first: small, and a failure there costs little
    cards = [_extra_files(b, _pair(b, p, out, draft), model_card) for b, _ in bundles]
    if progress is None and not quiet and sys.stderr.isatty():
        from fmtconv.convert.progress import RichProgress

        with RichProgress(p.bytes_with_drafter, sum(len(b.tensors) for b, _ in bundles), f"converting {Path(src).name}") as bar:
            return _write_bundles(bundles, cards, overwrite, workers, bar.update, bar.update_tensors)
    return _write_bundles(bundles, cards, overwrite, workers, progress, None)


def _write_bundles(bundles: list[tuple[Plan, Path]], cards: list[Callable[[Path], None] | None], overwrite: bool,
                   workers: int | None, progress: Callable[[int, int], None] | None,
                   tensor_progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Check every bundle, write each into its OUT.partial, then rename them all; the main bundle's summary, with the
    drafter's under "drafter".  Progress counts every bundle's bytes and tensors as one run."""
    from fmtconv.convert.pipeline import Converter

    total_bytes = sum(b.total_bytes for b, _ in bundles)
    total_tensors = sum(len(b.tensors) for b, _ in bundles)
    converters = []
    done_bytes = done_tensors = 0
    for b, out in bundles:
        converters.append(Converter(b, out, workers=workers, progress=_offset(progress, done_bytes, total_bytes),
                                    tensor_progress=_offset(tensor_progress, done_tensors, total_tensors)))
        done_bytes += b.total_bytes
        done_tensors += len(b.tensors)
    for c in converters:
        c.check(overwrite)
    for k, (c, card) in enumerate(zip(converters, cards)):
        try:
            c.write(card)
        except FmtconvError:
            if not c.partial.exists():  # bad input (its partial removed): the bundles written before it are no use
                for earlier in converters[:k]:
                    earlier.discard()
            raise  # resumable (a full disk): every partial stays for the same call to finish
    summaries = [c.commit(overwrite) for c in converters]
    result = summaries[-1]
    if len(summaries) > 1:
        result["drafter"] = summaries[0]
    return result


def _offset(report: Callable[[int, int], None] | None, before: int, total: int) -> Callable[[int, int], None] | None:
    """A bundle's (done, its total) progress reported as (done + what earlier bundles did, every bundle's total)."""
    if report is None:
        return None
    return lambda done, _total: report(before + done, total)


def _check_apart(out: Path, draft: Path) -> None:
    """The drafter bundle beside OUT, not OUT itself, inside it or around it."""
    o, d = out.resolve(), draft.resolve()
    if d == o or o in d.parents or d in o.parents:
        raise FmtconvError("the drafter bundle (--mtp-out) must be a directory of its own, not the output, inside it or "
                           "around it", file=draft)


def _pair(bundle: Plan, main: Plan, out: str | Path, draft: Path | None) -> str | None:
    """For a model card: the other bundle of a main + drafter pair (its folder name), else None."""
    if draft is None:
        return None
    return draft.name if bundle is main else Path(out).name


def _extra_files(p: Plan, pair: str | None, model_card: bool) -> Callable[[Path], None] | None:
    """What goes into OUT.partial beside the shards, index and config: the fitted recipe (--fit), the model card."""
    if not model_card and p.fit is None:
        return None

    def write(partial: Path) -> None:
        if p.fit is not None:
            from fmtconv.convert.fit.allocate import FIT_RECIPE_FILE

            (partial / FIT_RECIPE_FILE).write_text(p.fit["recipe_toml"])
        if model_card:
            from fmtconv.convert.publish.model_card import write_model_card

            write_model_card(partial, p, pair=pair)
        elif (p.source / "README.md").is_file():  # --keep-source-card: the side files skip it when extra files are written
            shutil.copyfile(p.source / "README.md", partial / "README.md")

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


def calibration_and_held_out(src: str | Path, n_tokens: int = 512, seq_len: int = 512):
    """The first n_tokens of the source's calibration stream (what --fit measures on) and the n_tokens after them (what
    the bundle is evaluated on, so that a fit is not judged on the data it was allocated from); the same tokens for
    both, and the report says so, where the stream is not twice as long."""
    from fmtconv.convert.check.eval.tokens import TokenBatch

    calibration = eval_tokens(src, [src], n_tokens=n_tokens, seq_len=seq_len)
    longer = eval_tokens(src, [src], n_tokens=2 * n_tokens, seq_len=seq_len)
    rest = longer.sequences[len(calibration.sequences):]
    if sum(map(len, rest)) < n_tokens or longer.sequences[: len(calibration.sequences)] != calibration.sequences:
        return calibration, TokenBatch(calibration.sequences, calibration.source + "; not held out: the stream is too short")
    return calibration, TokenBatch(rest, longer.source + f"; held out: the {n_tokens} tokens after the fit's calibration tokens")


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
