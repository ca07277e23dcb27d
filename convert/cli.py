"""The `fmtconv` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from fmtconv import __version__
from fmtconv.errors import FmtconvError


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


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
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['path']} ({len(report['files'])} file(s))")
    for col in ("group", "tensor", "dtype", "shape", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left", overflow="fold")
    for g in report["groups"]:
        for k, p in enumerate(g["parts"]):
            table.add_row(g["group"] if k == 0 else "", p["name"], p["dtype"], str(tuple(p["shape"])), _human(p["bytes"]))
    console = _console()
    console.print(table)
    s = report["summary"]
    console.print(f"{s['tensors']} tensors in {s['groups']} groups, {_human(s['bytes'])}")
    for dtype, d in s["by_dtype"].items():
        console.print(f"  {dtype:8s} {d['tensors']:6d} tensors  {_human(d['bytes'])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmtconv", description="Convert quantized LLM checkpoints into MLX bundles.")
    parser.add_argument("--version", action="version", version=f"fmtconv {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list a checkpoint's tensor groups, dtypes, shapes and bytes")
    p.add_argument("path", help="checkpoint directory or .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
