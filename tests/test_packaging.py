"""The three root folders install under the one import name `fmtconv`, and nothing lands bare."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_maps_the_root_folders() -> None:
    import fmtconv.convert
    import fmtconv.formats
    import fmtconv.kernels_ref

    for mod, folder in ((fmtconv.convert, "convert"), (fmtconv.formats, "formats"), (fmtconv.kernels_ref, "kernels_ref")):
        assert Path(mod.__file__).resolve().parent.name == folder
    for bare in ("convert", "formats", "kernels_ref"):
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
    for mod in ("fmtconv/convert/cli.py", "fmtconv/convert/layouts/deepseek_v4.py", "fmtconv/formats/mxfp4.py",
                "fmtconv/kernels_ref/affine.py", "fmtconv/errors.py"):
        assert mod in names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fmtconv = fmtconv.convert.cli:main" in entry
