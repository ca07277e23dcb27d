"""The house rules, read from the modules' own imports (every `import`, at module level or inside a function):
no module imports the command line but the command line itself, no import cycles between modules, and every
package folder is installed."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> folder, as pyproject's package-dir maps them.
FOLDERS = {"fmtconv": ROOT / "src" / "fmtconv", "fmtconv.convert": ROOT / "convert", "fmtconv.formats": ROOT / "formats",
           "fmtconv.kernels": ROOT / "kernels", "fmtconv.kernels_ref": ROOT / "kernels_ref"}
CLI = "fmtconv.convert.cli"


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out: dict[str, Path] = {}
    for prefix, folder in FOLDERS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("").parts
            if any(p.startswith((".", "__pycache__")) for p in rel):
                continue
            if prefix == "fmtconv" and rel[0] != "__init__" and len(rel) > 1:
                continue
            name = ".".join((prefix, *rel))
            out[name.removesuffix(".__init__")] = f
    return out


def _resolve(module: str, level: int, here: str, is_package: bool) -> str:
    if not level:
        return module
    base = here.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports: `from X import Y` counts X.Y where that is a module, else X."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
            for a in node.names:
                sub = f"{mod}.{a.name}"
                if sub in known:
                    found.add(sub)
                elif mod in known:
                    found.add(mod)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package() -> None:
    graph = _graph()
    assert CLI in graph and "fmtconv.convert.pipeline" in graph and "fmtconv.convert.check.conformance" in graph
    assert "fmtconv.convert.check.conformance" in graph["fmtconv.convert.pipeline"]  # a function-level import counts too
    assert "fmtconv.convert.plan" in graph["fmtconv.convert.api"]


def test_nothing_imports_the_command_line() -> None:
    offenders = sorted(m for m, deps in _graph().items() if CLI in deps and m != CLI)
    assert offenders == [], f"only the console entry point may import {CLI}: {offenders}"


def test_no_import_cycles() -> None:
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_every_package_folder_is_installed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(config["packages"]), config["package-dir"]
    folders = {name for name, path in _modules().items() if path.name == "__init__.py"}
    assert folders <= packages, f"package folders pyproject.toml does not install: {sorted(folders - packages)}"
    for name in folders:
        assert (ROOT / dirs[name]).resolve() == _modules()[name].parent.resolve(), name


def test_checks_never_import_the_pipeline() -> None:
    """The pipeline runs checks (conformance before the rename); a check reads plans and encodes, never writes OUT."""
    graph = _graph()
    offenders = sorted(m for m, deps in graph.items() if m.startswith("fmtconv.convert.check.") and "fmtconv.convert.pipeline" in deps)
    assert offenders == []
