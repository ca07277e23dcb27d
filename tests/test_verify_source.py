"""`fmtconv verify OUT --source SRC` on every fixture conversion: structure OK, every output tensor
compared with the source's exact decode, SQNR where the bit widths put it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmtconv.convert import convert
from fmtconv.formats.safetensors_io import Checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ["deepseek-v4-tiny", "deepseek-v3-fp8-tiny", "gpt-oss-tiny", "step3p5-mxfp4-tiny", "glm4-moe-lite-fp8-tiny",
         "qwen3-moe-fp8-tiny"]


@pytest.mark.parametrize("name", NAMES)
def test_sqnr_report_on_fixture_conversion(name: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    convert(FIXTURES / name, out, recipe="q4q8")
    run = subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", "verify", str(out), "--source", str(FIXTURES / name), "--json"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["ok"] and not report["problems"]
    with Checkpoint(out) as ck:
        n_weights = sum(1 for n in ck.tensors if not n.endswith((".scales", ".biases")))
    assert report["summary"]["compared"] == n_weights
    for t in report["tensors"]:
        if t["kind"].startswith("4-bit"):
            assert 15 < t["sqnr_db"] < 30, t  # the MXFP4/FP8 -> 4-bit affine reference point is ~20 dB
        elif t["kind"].startswith("8-bit"):
            assert t["sqnr_db"] > 35, t
        else:  # kept tensors are the source's values, at most rounded to the compute dtype
            assert t["sqnr_db"] == "inf" or t["sqnr_db"] > 45, t
