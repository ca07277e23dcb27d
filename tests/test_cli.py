"""The `fmtconv` commands on every fixture, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fmtconv.convert.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
MXFP4 = ["deepseek-v4-tiny", "gpt-oss-tiny", "step3p5-mxfp4-tiny"]
FP8 = ["deepseek-v3-fp8-tiny", "glm4-moe-lite-fp8-tiny", "qwen3-moe-fp8-tiny"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", *args], capture_output=True, text=True)


def test_inspect_reads_f8_e8m0_and_f8_e4m3(capsys) -> None:
    assert main(["inspect", str(FIXTURES / "deepseek-v4-tiny"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"F8_E8M0", "F8_E4M3", "I8", "BF16"} <= set(report["summary"]["by_dtype"])
    expert = next(g for g in report["groups"] if g["group"] == "layers.0.ffn.experts.0.w1")
    assert {p["dtype"] for p in expert["parts"]} == {"I8", "F8_E8M0"}
    run = _cli("inspect", str(FIXTURES / "deepseek-v4-tiny"))
    assert run.returncode == 0 and "F8_E8M0" in run.stdout and "tensors in" in run.stdout


@pytest.mark.parametrize("name", MXFP4)
def test_mxfp4_to_affine(name: str, tmp_path: Path, capsys) -> None:
    assert main(["mxfp4-to-affine", str(FIXTURES / name), str(tmp_path / "out"), "--bits", "4", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert summary["tensors"] > 0 and config["fmtconv"]["recipe"].startswith("mxfp4-to-affine")
    bits = {v["bits"] for k, v in config["quantization"].items() if isinstance(v, dict)} | {config["quantization"]["bits"]}
    assert bits == {4, 8}


@pytest.mark.parametrize("name", FP8)
def test_fp8_to_affine(name: str, tmp_path: Path) -> None:
    assert main(["fp8-to-affine", str(FIXTURES / name), str(tmp_path / "out"), "--bits", "6", "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization"]["bits"] in (6, 8)
    assert "weight_block_size" not in json.dumps(config["quantization_config"])


def test_wrong_source_format_for_the_command(tmp_path: Path) -> None:
    run = _cli("mxfp4-to-affine", str(FIXTURES / "deepseek-v3-fp8-tiny"), str(tmp_path / "out"))
    assert run.returncode == 2 and "no mxfp4 tensors" in run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", MXFP4 + FP8)
def test_plan_json_and_table(name: str) -> None:
    run = _cli("plan", str(FIXTURES / name), "--recipe", "q4q8", "--json")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert plan["table"] and plan["bits_per_weight"] > 0 and plan["total_bytes"] > 0
    assert all(r["count"] > 0 for r in plan["table"])
    table = _cli("plan", str(FIXTURES / name), "--recipe", "dq4")
    assert table.returncode == 0 and "bits per weight" in table.stdout and "{i}" in table.stdout


def test_convert_needs_a_recipe_and_names_bad_ones(tmp_path: Path) -> None:
    run = _cli("convert", str(FIXTURES / "gpt-oss-tiny"), str(tmp_path / "out"), "--recipe", "q5q9")
    assert run.returncode == 2 and "neither a preset" in run.stderr
    assert _cli("convert", str(FIXTURES / "gpt-oss-tiny"), str(tmp_path / "out")).returncode == 2


def test_recipes_lists_presets() -> None:
    run = _cli("recipes")
    assert run.returncode == 0 and "q4q8" in run.stdout and "mixed_3_6" in run.stdout


def test_model_card_or_the_source_card(tmp_path: Path) -> None:
    src = tmp_path / "src"
    import shutil

    shutil.copytree(FIXTURES / "gpt-oss-tiny", src)
    (src / "README.md").write_text("# the maker's card\n")
    assert main(["convert", str(src), str(tmp_path / "a"), "--recipe", "q4q8", "--quiet"]) == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "fmtconv" in card and "q4q8" in card and "maker's card" not in card
    assert main(["convert", str(src), str(tmp_path / "b"), "--recipe", "q4q8", "--quiet", "--keep-source-card"]) == 0
    assert (tmp_path / "b" / "README.md").read_text() == "# the maker's card\n"
