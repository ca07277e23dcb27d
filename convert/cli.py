"""The `fmtconv` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from fmtconv import __version__
from fmtconv.convert.runtimes import RUNTIMES
from fmtconv.convert.units import human_bytes
from fmtconv.errors import FmtconvError


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fmtconv.convert.inspect import inspect_checkpoint

    report = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.table import Table

    table = Table(title=f"{report['path']} ({len(report['files'])} file(s))")
    for col in ("group", "tensor", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for g in report["groups"]:
        for k, p in enumerate(g["parts"]):
            table.add_row(g["group"] if k == 0 else "", p["name"], p["dtype"], str(tuple(p["shape"])), human_bytes(p["bytes"]))
    console = _console()
    console.print(table)
    s = report["summary"]
    console.print(f"{s['tensors']} tensors in {s['groups']} groups, {human_bytes(s['bytes'])}")
    for dtype, d in s["by_dtype"].items():
        console.print(f"  {dtype:8s} {d['tensors']:6d} tensors  {human_bytes(d['bytes'])}")
    return 0


def _parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGTIB")
    unit = t[len(num):]
    if unit not in units:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB)")
    try:
        return int(float(num) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 5GB, 500MB)") from None


def _recipe_for(args: argparse.Namespace):
    """The recipe, or with --fit / --target-bpw the constraints (None: none)."""
    from fmtconv.convert.recipes import load_recipe, source_recipe

    if getattr(args, "recipe", None):
        return load_recipe(args.recipe)
    if _fits(args):
        return None
    if args.command in ("mxfp4-to-affine", "fp8-to-affine"):
        codec = "mxfp4" if args.command == "mxfp4-to-affine" else "fp8_block"
        name = f"{args.command}-{args.bits}bit-g{args.group_size}" + (f"-other{args.other_bits}" if args.other_bits != 8 else "")
        return source_recipe(args.bits, args.group_size, (codec,), name, other_bits=args.other_bits)
    return load_recipe("q4q8")


def _resolve_src(args: argparse.Namespace) -> None:
    """A hub repo id (`org/name`) is downloaded (only the files a conversion needs) into the cache."""
    from fmtconv.convert.publish.hub import is_repo_id, resolve_source

    if is_repo_id(str(args.src)):
        args.src = str(resolve_source(args.src, revision=args.revision, cache_dir=args.cache_dir))


def _plan_options(args: argparse.Namespace, fit_tokens: Any = None) -> dict:
    """The plan's keyword arguments from the command line (the fit's tokens checked here, before anything is written)."""
    opts = {"compute_dtype": args.dtype, "kernel_backend": args.kernel_backend, "rounding": args.rounding, "family": args.family,
            "max_shard_bytes": args.max_shard_size, "runtime": args.runtime, "encoder": args.encoder, "mtp": args.mtp,
            "group_size": None if args.command in ("mxfp4-to-affine", "fp8-to-affine") else args.group_size}
    if _fits(args):
        from fmtconv.convert.api import eval_tokens

        opts.update(fit=args.fit, target_bpw=args.target_bpw, fit_cache=args.fit_cache,
                    fit_tokens=fit_tokens if fit_tokens is not None else eval_tokens(
                        args.src, [args.src], tokens=args.tokens, text=args.text, n_tokens=args.n_tokens, seq_len=args.seq_len))
        if not getattr(args, "quiet", False) and not args.json and sys.stderr.isatty():
            opts["fit_progress"] = lambda stage, done, total: print(f"\rmeasuring sensitivities: {stage} layer {done}/{total}",
                                                                     end="" if done < total else "\n", file=sys.stderr)
    return opts


def _plan_from_args(args: argparse.Namespace):
    from fmtconv.convert.api import plan

    _resolve_src(args)
    return plan(args.src, _recipe_for(args), **_plan_options(args))


def _plan_table(p, title: str):
    from rich.table import Table

    table = Table(title=title)
    renamed = any(t.runtime_module != t.target.module for t in p.tensors)  # vMLX: stored names, runtime paths differ
    columns = ("module pattern", *(("runtime path",) if renamed else ()), "mode", "bits", "group", "dtype", "route", "count",
               "params", "bytes")
    for col in columns:
        table.add_column(col, overflow="fold", justify="right" if col in ("bits", "group", "count", "params", "bytes") else "left")
    for r in p.table():
        quant = r["mode"] != "dense"
        table.add_row(r["pattern"], *((r["runtime_path"],) if renamed else ()), r["mode"], str(r["bits"]) if quant else "-",
                      str(r["group_size"]) if quant else "-", r["dtype"], r["route"], str(r["count"]), f"{r['params']:,}",
                      human_bytes(r["bytes"]))
    return table


def _print_plan(p, console) -> None:
    console.print(_plan_table(p, f"plan: {p.source} -> recipe {p.recipe.name}, layout {p.layout.family} for {p.runtime} "
                                 f"({p.model_module}), {p.compute_dtype}"))
    console.print(f"total {human_bytes(p.total_bytes)} in {len(p.shards)} shard(s) from {human_bytes(p.source_bytes)}; "
                  f"{p.total_params:,} parameters, {p.bits_per_weight:.3f} bits per weight")
    for label, n in sorted(p.bit_distribution().items()):
        console.print(f"  {label:18s} {n / max(p.total_params, 1):7.2%} of parameters")
    if p.dropped:
        patterns = ", ".join(f"{k} (x{n})" for k, n in p.dropped_patterns().items())
        console.print(f"dropped {len(p.dropped)} source tensor(s) {p.runtime} does not load: {patterns}"
                      + (" (the MTP layer's go to the drafter bundle)" if p.drafter is not None else ""))
    if p.drafter is not None:
        d = p.drafter
        console.print(_plan_table(d, f"drafter (--mtp): the MTP layer, layout {d.layout.family} for {d.runtime} ({d.model_module})"))
        console.print(f"drafter {human_bytes(d.total_bytes)} in {len(d.shards)} shard(s); {d.total_params:,} parameters, "
                      f"{d.bits_per_weight:.3f} bits per weight")
        console.print(f"total with the drafter {human_bytes(p.bytes_with_drafter)} in {len(p.shards) + len(d.shards)} shard(s)")
    if p.fit is not None:
        f = p.fit
        console.print(f"fit: budget {human_bytes(f['budget_bytes'])} ({f['budget_bytes']:,} bytes), planned "
                      f"{human_bytes(f['planned_bytes'])} ({f['planned_bytes']:,} bytes), predicted KL {f['predicted_kl']:.5f} "
                      f"nats/token; sensitivities {'measured' if f['measured'] else 'from the cache'}"
                      + (f" ({f['sensitivity_cache']})" if f["sensitivity_cache"] else ""))
        console.print("the allocation as a recipe (convert writes it into OUT as fit-recipe.toml):")
        console.print(f["recipe_toml"], markup=False, highlight=False)
    for w in p.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")


def _cmd_plan(args: argparse.Namespace) -> int:
    p = _plan_from_args(args)
    if args.json:
        print(json.dumps(p.to_json(), indent=2))
    else:
        _print_plan(p, _console())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from fmtconv.convert.api import convert

    if args.mtp_out and not args.mtp:
        raise FmtconvError("--mtp-out names where the drafter bundle goes; it needs --mtp")
    if args.command == "convert" and not args.recipe and not _fits(args):
        raise FmtconvError("fmtconv convert needs --recipe NAME|FILE, or --fit SIZE / --target-bpw X")
    _resolve_src(args)
    recipe = _recipe_for(args)
    if args.command in ("mxfp4-to-affine", "fp8-to-affine") and not args.recipe and not _fits(args):
        codec = "mxfp4" if args.command == "mxfp4-to-affine" else "fp8_block"
        p = _plan_from_args(args)
        if not any(t.source_codec == codec for t in p.tensors):
            raise FmtconvError(f"no {codec} tensors found; use `fmtconv convert --recipe` for this checkpoint", file=args.src)
    batch = fit_batch = None
    if args.eval:  # bad token input is refused before anything is written
        from fmtconv.convert.api import calibration_and_held_out, eval_tokens

        if _fits(args) and not (args.tokens or args.text):  # judged on tokens the fit did not measure on
            fit_batch, batch = calibration_and_held_out(args.src, args.n_tokens, args.seq_len)
        else:
            batch = eval_tokens(args.src, [args.src], tokens=args.tokens, text=args.text, n_tokens=args.n_tokens,
                                seq_len=args.seq_len)
    result = convert(args.src, args.out, recipe=recipe, overwrite=args.overwrite, quiet=args.quiet or args.json,
                     workers=args.workers, model_card=not args.keep_source_card, mtp_out=args.mtp_out,
                     **_plan_options(args, fit_batch))
    if not args.json and not args.quiet:
        console = _console()
        console.print(f"wrote {result['output']}: {result['tensors']} tensors in {result['shards']} shard(s), "
                      f"{human_bytes(result['bytes_in'])} in -> {human_bytes(result['bytes_out'])} out, "
                      f"{result['bits_per_weight']:.3f} bits per weight, {result['wall_s']:.1f} s "
                      f"({(result['params_per_s'] or 0) / 1e6:.1f} Mparam/s)")
        if "drafter" in result:
            d = result["drafter"]
            console.print(f"wrote the drafter {d['output']}: {d['tensors']} tensors in {d['shards']} shard(s), "
                          f"{human_bytes(d['bytes_out'])}, {d['bits_per_weight']:.3f} bits per weight")
        for w in result["warnings"]:
            console.print(f"[yellow]warning:[/yellow] {w}")
    if args.eval:
        from fmtconv.convert.api import evaluate
        from fmtconv.convert.check.eval import report_text

        report = evaluate(args.out, args.src, batch=batch, student_float32=args.student_float32, quiet=args.quiet or args.json)
        if args.json:
            result["eval"] = report.to_json()
        elif not args.quiet:
            print(report_text(report.to_json()))
    if args.json:
        print(json.dumps(result, indent=2))
    if args.upload_repo:
        from fmtconv.convert.publish.hub import upload_bundle

        url = upload_bundle(args.out, args.upload_repo)
        if not args.quiet:
            print(f"uploaded to {url}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from fmtconv.convert.check.verify import verify_bundle

    if args.source:
        from fmtconv.convert.publish.hub import is_repo_id, resolve_source
        from fmtconv.convert.check.source_values import source_pairs
        from fmtconv.formats.safetensors_io import Checkpoint

        src = str(resolve_source(args.source, revision=args.revision, cache_dir=args.cache_dir)) if is_repo_id(args.source) else args.source
        with Checkpoint(src) as ck:
            report = verify_bundle(args.out, src, pairs=source_pairs(args.out, src, ck), threshold_db=args.threshold)
    else:
        report = verify_bundle(args.out, threshold_db=args.threshold)
    if args.compare_encoders:
        from fmtconv.convert.check.encoder_compare import compare_encoders

        if not args.source:
            raise FmtconvError("--compare-encoders needs --source (the values both encoders are run on)")
        report.encoders = compare_encoders(args.out, src)
    ok = report.ok
    out = report.to_json()
    text = report.to_text()
    if args.runtime is not None:
        from fmtconv.convert.check.conformance import check_bundle
        from fmtconv.convert.runtimes import owner_of

        runtime = args.runtime or _bundle_runtime(args.out) or owner_of(_bundle_config(args.out).get("model_type")).name
        conf = check_bundle(args.out, runtime)
        ok = ok and not conf.problems
        out["conformance"] = conf.to_json()
        text += "\n" + _conformance_text(conf)
    print(json.dumps(out, indent=2) if args.json else text)
    return 0 if ok else 1


def _bundle_config(out) -> dict:
    from pathlib import Path

    path = Path(out) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FmtconvError(f"cannot read the bundle's config ({e})", file=path) from None


def _bundle_runtime(out) -> str | None:
    """The runtime a bundle says it was written for (config.json's fmtconv block)."""
    return (_bundle_config(out).get("fmtconv") or {}).get("runtime")


def _conformance_text(conf) -> str:
    if conf.skipped:
        return f"runtime check: skipped: {conf.skipped}"
    if not conf.problems:
        return (f"runtime check: {conf.model_module} ({conf.runtime}) loads all {conf.tensors} tensors, "
                f"{conf.quantized_modules} quantized modules ({conf.seconds:.1f} s)")
    lines = [f"runtime check: {len(conf.problems)} difference(s) against {conf.model_module} ({conf.runtime}):"]
    return "\n".join(lines + [f"  {p}" for p in conf.problems])


def _add_token_options(p: argparse.ArgumentParser) -> None:
    tokens = p.add_mutually_exclusive_group()
    tokens.add_argument("--tokens", help="a JSON file: a list of lists of token ids")
    tokens.add_argument("--text", help="a text file, tokenized with the checkpoint's own tokenizer "
                                       "(default: fmtconv's calibration text: prose, code, math, a few non-English lines)")
    p.add_argument("--n-tokens", type=int, default=512, help="tokens of the text to run on (default 512)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    _add_token_options(p)
    p.add_argument("--student-float32", action="store_true",
                   help="run the bundle with float32 activations instead of its own dtype (the report says which ran)")


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fit", type=_parse_size, metavar="SIZE",
                      help="the allocation with the least predicted KL whose weight shards (a --mtp drafter's included) take "
                           "at most SIZE (e.g. 100GB), from sensitivities measured on the calibration tokens; a --recipe "
                           "given with it pins the modules its rules match")
    size.add_argument("--target-bpw", type=float, metavar="X", help="as --fit, the budget given as bits per weight")
    p.add_argument("--fit-cache", help="where measured sensitivities are cached (default: SRC.fmtconv-cache/ beside the "
                                       "source, else the user cache directory; FMTCONV_CACHE_DIR overrides)")


def _fits(args: argparse.Namespace) -> bool:
    return getattr(args, "fit", None) is not None or getattr(args, "target_bpw", None) is not None


def _cmd_eval(args: argparse.Namespace) -> int:
    from fmtconv.convert.api import evaluate
    from fmtconv.convert.check.eval import report_text

    report = evaluate(args.out, args.source, tokens=args.tokens, text=args.text, n_tokens=args.n_tokens, seq_len=args.seq_len,
                      student_float32=args.student_float32, quiet=args.quiet or args.json, record=not args.no_record)
    data = report.to_json()
    print(json.dumps(data, indent=2) if args.json else report_text(data))
    return 0


def _add_common(p: argparse.ArgumentParser, with_out: bool) -> None:
    p.add_argument("src", help="source checkpoint directory")
    if with_out:
        p.add_argument("out", help="output directory (written via OUT.partial, renamed when complete)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help="compute dtype (default: config's torch_dtype)")
    p.add_argument("--kernel-backend", default="metal", choices=["metal", "cuda", "cpu"],
                   help="whose affine arithmetic to reproduce: metal (what mlx_lm.convert writes on a Mac, default) or cpu")
    p.add_argument("--rounding", default="mlx-lm", choices=["mlx-lm", "exact"],
                   help="FP8 x float32 scale: round as mlx_lm's sanitize does (default) or once, exactly")
    p.add_argument("--family", help="model layout family (default: from config model_type)")
    p.add_argument("--encoder", default="minmax", choices=["minmax", "mse"],
                   help="affine scales/biases: minmax (MLX's own, bit-exact with mx.quantize, default) or mse "
                        "(error-minimising, same format and size); a recipe rule's `encoder` overrides it")
    p.add_argument("--runtime", choices=list(RUNTIMES),
                   help="the MLX package the bundle is written for (default: the one that owns the model_type; "
                        "vmlx: vMLX's DeepSeek-V4)")
    p.add_argument("--max-shard-size", type=_parse_size, default="5GiB", help="shard size cap (default 5GiB, as mlx_lm)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--revision", help="hub revision when SRC is a repo id (org/name)")
    p.add_argument("--cache-dir", help="hub cache directory (default: the standard huggingface_hub cache)")
    p.add_argument("--mtp", action="store_true",
                   help="also convert the release's multi-token-prediction layer into a drafter bundle for mlx-vlm's "
                        "speculative decoding (DeepSeek-V4-Flash; the recipe's rules match the drafter's module paths)")
    if with_out:
        p.add_argument("--mtp-out", help="where --mtp writes the drafter bundle (default: OUT-mtp next to OUT)")
        p.add_argument("--upload-repo", help="upload OUT to this hub repo after a successful verify")
        p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
        p.add_argument("--quiet", action="store_true", help="no progress display")
        p.add_argument("--workers", type=int, help="threads (default: all cores)")
        p.add_argument("--keep-source-card", action="store_true", help="copy the source README.md instead of writing a model card")
        p.add_argument("--eval", action="store_true",
                       help="then evaluate OUT against SRC (as `fmtconv eval`; the report goes into OUT and its model card)")
        _add_eval_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmtconv", description="Convert quantized LLM checkpoints into MLX bundles.")
    parser.add_argument("--version", action="version", version=f"fmtconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a checkpoint's tensor groups, dtypes, shapes and bytes")
    p.add_argument("path", help="checkpoint directory or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)

    for name, help_text, default_bits in (
        ("mxfp4-to-affine", "MXFP4 tensors -> MLX affine at --bits; FP8/dense linear layers at --other-bits; small tensors kept", 4),
        ("fp8-to-affine", "FP8-block tensors -> MLX affine at --bits; other linear layers at --other-bits; small tensors kept", 8),
    ):
        p = sub.add_parser(name, help=help_text)
        _add_common(p, with_out=True)
        p.add_argument("--bits", type=int, default=default_bits, choices=[2, 3, 4, 5, 6, 8])
        p.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128])
        p.add_argument("--other-bits", type=int, default=8, choices=[2, 3, 4, 5, 6, 8],
                       help="bits for the other linear layers and embeddings (group 64; default 8). With --bits 4 "
                            "--other-bits 4 every quantizable module gets what `mlx_lm.convert -q --q-bits 4` gives it")
        p.add_argument("--recipe", help="preset name or recipe file (overrides --bits/--group-size/--other-bits); "
                                        "with --fit, the constraints")
        _add_fit_options(p)
        p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("convert", help="any source format to any target, by recipe")
    _add_common(p, with_out=True)
    p.add_argument("--recipe", help="preset name or recipe file (TOML or JSON); with --fit, the constraints")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="every affine rule of the recipe at this group size")
    _add_fit_options(p)
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("plan", help="print what a conversion would write, before writing anything")
    _add_common(p, with_out=False)
    p.add_argument("--recipe", help="preset name or recipe file (default q4q8); with --fit, the constraints")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], help="every affine rule of the recipe at this group size")
    _add_fit_options(p)
    _add_token_options(p)
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("verify", help="check a bundle's structure; with --source also SQNR per tensor")
    p.add_argument("out", help="the MLX bundle directory")
    p.add_argument("--source", help="the source checkpoint (directory or hub repo id) for the SQNR report")
    p.add_argument("--revision", help="hub revision when --source is a repo id")
    p.add_argument("--cache-dir", help="hub cache directory")
    p.add_argument("--threshold", type=float, help="SQNR floor in dB for outliers (default: per output kind)")
    p.add_argument("--compare-encoders", action="store_true",
                   help="with --source: re-encode every affine module with minmax and with mse, SQNR per module pattern")
    p.add_argument("--runtime", nargs="?", const="", choices=["", *RUNTIMES],
                   help="also check the bundle against the runtime's own model class (default: the one it was written for)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("eval", help="model-level quality against the exact source: KL, top-1/top-5, perplexity, per-layer "
                                    "errors (both models streamed layer by layer)")
    p.add_argument("out", help="the MLX bundle directory")
    p.add_argument("--source", required=True, help="the source checkpoint the bundle was converted from")
    _add_eval_options(p)
    p.add_argument("--no-record", action="store_true",
                   help="do not keep the report in OUT (fmtconv-eval.json) nor add it to the model card")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench", help="benchmark: fmtconv vs the usual pipeline, a plain copy and mlx_lm.convert; "
                                     "the kernels; or the two encoders")
    p.add_argument("what", nargs="?", default="pipeline", choices=["pipeline", "kernels", "encoders", "quality", "eval", "fit"])
    p.add_argument("--size", type=_parse_size, action="append",
                   help="synthetic checkpoint size (default 4GB); give it twice (e.g. --size 4GB --size 8GB) for the scaling check")
    p.add_argument("--dir", help="where the synthetic checkpoints live (default ./bench-data)")
    p.add_argument("--phases", default="fmtconv,fmtconv_metal,usual,copy,threads,v3",
                   help="comma-separated subset of fmtconv, fmtconv_metal, usual, copy, threads, v3, and mse (fmtconv with "
                        "--encoder mse; not in the default)")
    p.add_argument("--workers", type=int, help="fmtconv threads in the fmtconv phases (default: all cores)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run fmtconv, copy, fmtconv_metal, mse and v3_fmtconv N times, interleaved, and report each one's "
                        "median run (for shared machines; default 1)")
    p.add_argument("--cold", action="store_true",
                   help="drop the source's pages from the page cache before every phase (Linux), so each reads it from disk")
    p.add_argument("--keep", action="store_true", help="keep the converted outputs")
    p.add_argument("--discard-data", action="store_true",
                   help="remove each size's synthetic checkpoints once its phases are done (default: kept for the next run)")
    p.add_argument("--kernel-backend", default="cpu", choices=["metal", "cuda", "cpu"],
                   help="encoders bench: the affine arithmetic (default cpu)")
    p.add_argument("--source", action="extend", nargs="+",
                   help="encoders bench: also measure these checkpoints' tensors; quality bench: the sources to convert")
    p.add_argument("--recipes", help="quality bench: comma-separated presets or files, or 'all' (default q4q8,mixed_3_6); "
                                    "fit bench: the presets whose sizes are the budgets (default q4q8,mixed_3_6,mixed_2_6)")
    p.add_argument("--encoders", default="minmax,mse", help="quality bench: comma-separated encoders")
    p.add_argument("--n-tokens", type=int, default=2048, help="quality and eval benches: tokens each bundle is evaluated on "
                                                               "(default 2048, in sequences of 512)")
    p.add_argument("--bound", action="store_true", help="encoders bench: add an exhaustive search's gain (slow) for dense 4-bit")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("recipes", help="list the preset recipes")
    p.set_defaults(func=_cmd_recipes)
    return parser


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "kernels":
        from fmtconv.kernels.bench import run_compiled_bench
        from fmtconv.kernels_ref.bench import run_kernel_bench

        result = {"reference_vs_mlx": run_kernel_bench(), "compiled": run_compiled_bench()}
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            for section, figures in result.items():
                print(section)
                for k, v in figures.items():
                    print(f"  {k:46s} {v:.3f}" if isinstance(v, float) else f"  {k:46s} {v}")
        return 0
    if args.what == "encoders":
        from fmtconv.convert.bench.encoders import print_encoder_table, run_encoder_bench

        rows = run_encoder_bench(args.source or [], kernel_backend=args.kernel_backend, bound=args.bound)
        print(json.dumps(rows, indent=2) if args.json else print_encoder_table(rows))
        return 0
    if args.what == "eval":
        from pathlib import Path

        from fmtconv.convert.bench.eval_memory import print_eval_bench, run_eval_bench

        print_eval_bench(run_eval_bench(Path(args.dir) if args.dir else None, n_tokens=min(args.n_tokens, 128), quiet=args.json),
                         args.json)
        return 0
    if args.what == "fit":
        from fmtconv.convert.bench.fit import print_fit_bench, run_fit_bench

        if not args.source:
            raise FmtconvError("bench fit needs --source (one or more checkpoints, e.g. --source fixtures/*-tiny)")
        from fmtconv.convert.bench.fit import PRESETS

        presets = [r for r in args.recipes.split(",") if r] if args.recipes else PRESETS
        report = run_fit_bench(args.source, presets, n_tokens=args.n_tokens, seq_len=min(args.n_tokens, 512))
        print_fit_bench(report, args.json)
        return 0
    if args.what == "quality":
        from fmtconv.convert.bench.quality import print_quality, run_quality_bench

        if not args.source:
            raise FmtconvError("bench quality needs --source (one or more checkpoints, e.g. --source fixtures/*-tiny)")
        rows = run_quality_bench(args.source, [r for r in (args.recipes or "q4q8,mixed_3_6").split(",") if r],
                                 [e for e in args.encoders.split(",") if e], n_tokens=args.n_tokens, seq_len=min(args.n_tokens, 512))
        print_quality(rows, args.json)
        return 0
    from pathlib import Path

    from fmtconv.convert.bench.runner import run_bench

    sizes = args.size or [4 * 10**9]
    phases = tuple(x.strip() for x in args.phases.split(",") if x.strip())
    run_bench(Path(args.dir) if args.dir else None, sizes if len(sizes) > 1 else sizes[0], args.json, args.keep,
              workers=args.workers, phases=phases, repeat=args.repeat, cold=args.cold, discard_data=args.discard_data)
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from fmtconv.convert.recipes import describe_presets

    for name, desc in describe_presets().items():
        print(f"{name:16s} {desc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:  # past a file-size limit (ulimit -f) a write then fails with EFBIG, reported as disk full, instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (AttributeError, ValueError):  # no SIGXFSZ on this platform, or main() called off the main thread
        pass
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FmtconvError as e:
        print(f"fmtconv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmtconv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
