"""The root code folders install under the one import name `fmtconv`, and nothing lands bare."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_root_folders() -> None:
    import fmtconv.convert
    import fmtconv.formats
    import fmtconv.kernels
    import fmtconv.kernels_ref

    for mod, folder in ((fmtconv.convert, "convert"), (fmtconv.formats, "formats"), (fmtconv.kernels, "kernels"),
                        (fmtconv.kernels_ref, "kernels_ref")):
        assert Path(mod.__file__).resolve().parent.name == folder
    for bare in ("convert", "formats", "kernels", "kernels_ref"):
        spec = importlib.util.find_spec(bare)
        assert spec is None or ROOT in Path(spec.origin or "/").resolve().parents


def _can_build_offline() -> bool:
    """setuptools with bdist_wheel here (>= 70.1 has it built in, older needs `wheel`)."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_regular_wheel_holds_only_fmtconv(tmp_path: Path) -> None:
    # Build isolation fetches setuptools from the package index when this environment lacks it.
    isolation = ["--no-build-isolation"] if _can_build_offline() else []
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", *isolation, "-q", "-w", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    wheel = next(tmp_path.glob("fmtconv-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"fmtconv", next(t for t in top if t.endswith(".dist-info"))}
    for mod in ("fmtconv/convert/cli.py", "fmtconv/convert/layouts/deepseek_v4.py", "fmtconv/convert/releases/deepseek_v4.py",
                "fmtconv/formats/mxfp4.py", "fmtconv/kernels_ref/affine.py", "fmtconv/kernels/mxfp4.py", "fmtconv/errors.py",
                "fmtconv/convert/check/eval/calibration.txt"):
        assert mod in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fmtconv = fmtconv.convert.cli:main" in entry


def _lower_bounds(requirements: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (minimum version, environment marker) for every `name[extra]>=v; marker` line."""
    out = {}
    for req in requirements:
        spec, _, marker = req.partition(";")
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*>=\s*([^,\s]+)\s*", spec)
        assert m, f"pyproject.toml: {req!r} is not of the form name>=version"
        out[_normal(m.group(1))] = (m.group(2), " ".join(marker.replace('"', "'").split()))
    return out


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_minimum_versions_file_equals_the_pyproject_pins() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {}
    for reqs in (meta["dependencies"], *meta["optional-dependencies"].values()):
        for name, (version, marker) in _lower_bounds(reqs).items():
            # mlx is declared per platform (mlx / mlx[cpu]) with one minimum: one pin serves both.
            declared[name] = (version, "" if name == "mlx" else marker)
    pinned = {}
    for line in (ROOT / ".ci" / "constraints-min.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            spec, _, marker = line.partition(";")
            name, version = (s.strip() for s in spec.split("=="))
            pinned[_normal(name)] = (version, " ".join(marker.replace('"', "'").split()))
    assert pinned == declared
