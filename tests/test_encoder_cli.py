"""--encoder and recipe `encoder` through plan, pipeline, config, model card and verify --compare-encoders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmtconv.convert import convert, plan
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import Checkpoint

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
V4 = FIXTURES / "deepseek-v4-tiny"


def _fmtconv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", *map(str, args)], capture_output=True, text=True)


def test_rule_encoder_is_validated_naming_the_rule():
    with pytest.raises(FmtconvError, match=r"rule 2 \(affine\.encoder\): Input should be 'minmax' or 'mse', got 'l2'"):
        recipe_from_dict({"rules": [{"mode": "affine", "bits": 4}, {"mode": "affine", "bits": 8, "encoder": "l2"}]})
    with pytest.raises(FmtconvError, match=r"rule 1 \(mxfp4\.encoder\): Extra inputs"):  # only affine rules have one
        recipe_from_dict({"rules": [{"mode": "mxfp4", "encoder": "mse"}]})


def test_unknown_encoder_is_refused():
    with pytest.raises(FmtconvError, match="--encoder 'l2'"):
        plan(V4, "q4q8", encoder="l2")
    r = _fmtconv("plan", V4, "--encoder", "l2")
    assert r.returncode == 2 and "invalid choice: 'l2'" in r.stderr


def test_plan_resolves_rule_encoder_over_the_default():
    recipe = recipe_from_dict({"rules": [
        {"match": r"switch_mlp\.", "mode": "affine", "bits": 4, "encoder": "minmax", "on_indivisible": "keep"},
        {"mode": "affine", "bits": 8, "on_indivisible": "keep"}]})
    p = plan(V4, recipe, encoder="mse")
    enc = {t.target.module: t.encoder for t in p.tensors if t.quantized}
    assert enc and all((e == "minmax") == ("switch_mlp." in m) for m, e in enc.items())
    assert all(t.encoder is None for t in p.tensors if not t.quantized)
    assert p.fingerprint() != plan(V4, recipe, encoder="minmax").fingerprint()
    assert p.to_json()["encoder"] == "mse"


def test_minmax_is_the_default_and_unchanged(tmp_path):
    a = convert(V4, tmp_path / "a", recipe="q4q8", kernel_backend="cpu", quiet=True)
    b = convert(V4, tmp_path / "b", recipe="q4q8", kernel_backend="cpu", quiet=True, encoder="minmax")
    assert a["bytes_out"] == b["bytes_out"]
    with Checkpoint(tmp_path / "a") as x, Checkpoint(tmp_path / "b") as y:
        assert all(np.array_equal(x.raw(n), y.raw(n)) for n in x.tensors)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())["fmtconv"]
    assert cfg["encoder"] == "minmax" and set(cfg["encoders"].values()) == {"minmax"}
    assert "Affine encoder | minmax" in (tmp_path / "a" / "README.md").read_text()


def test_cli_mse_bundle_card_and_compare_encoders(tmp_path):
    out = tmp_path / "mse"
    r = _fmtconv("mxfp4-to-affine", V4, out, "--encoder", "mse", "--quiet", "--kernel-backend", "cpu")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fmtconv"]["encoder"] == "mse"
    assert cfg["fmtconv"]["encoders"]["model.layers.{i}.mlp.experts.switch_mlp.down_proj"] == "mse"
    assert "quantization" in cfg and "encoder" not in json.dumps(cfg["quantization"])  # plain MLX affine block
    card = (out / "README.md").read_text()
    assert "| Affine encoder | mse (" in card
    r = _fmtconv("verify", out, "--source", V4, "--compare-encoders", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["pattern"]: row for row in json.loads(r.stdout)["encoders"]}
    experts = rows["model.layers.{i}.mlp.experts.switch_mlp.gate_proj"]
    assert experts["bits"] == 4 and experts["written_with"] == "mse" and experts["gain_db"] > 1.0
    assert all(row["gain_db"] >= 0 for row in rows.values())
    text = _fmtconv("verify", out, "--source", V4, "--compare-encoders")
    assert text.returncode == 0 and "minmax dB" in text.stdout and "switch_mlp.gate_proj" in text.stdout


def test_compare_encoders_needs_source(tmp_path):
    out = tmp_path / "b"
    convert(V4, out, recipe="q4q8", quiet=True)
    r = _fmtconv("verify", out, "--compare-encoders")
    assert r.returncode == 2 and "--compare-encoders needs --source" in r.stderr


def test_bench_phases_are_checked():
    r = _fmtconv("bench", "--phases", "fmtconv,nope")
    assert r.returncode == 2 and "--phases" in r.stderr


def test_card_names_the_encoder_per_pattern_when_mixed():
    from fmtconv.convert.publish.model_card import encoder_summary

    cfg = {"fmtconv": {"encoder": "minmax", "encoders": {"model.layers.{i}.mlp.switch_mlp.up_proj": "mse", "lm_head": "minmax"}}}
    text = encoder_summary(cfg)
    assert text.startswith("minmax (") and "mse (" in text and "`model.layers.{i}.mlp.switch_mlp.up_proj`" in text
    assert encoder_summary({"fmtconv": {"encoder": "mse", "encoders": {}}}).startswith("mse (")
    assert encoder_summary({}) is None  # not written by fmtconv: nothing claimed


def test_bench_encoders_rows(monkeypatch):
    from fmtconv.convert.bench import encoders as encoder_bench

    monkeypatch.setattr(encoder_bench, "_SHAPE", (16, 512))
    monkeypatch.setattr(encoder_bench, "BITS", (4,))
    monkeypatch.setattr(encoder_bench, "GROUPS", (64,))
    monkeypatch.setattr(encoder_bench, "_BOUND_GROUPS", 32)
    rows = encoder_bench.run_encoder_bench([FIXTURES / "gpt-oss-tiny"], bound=True)
    by = {r["class"]: r for r in rows}
    assert set(by) == {"MXFP4 experts (synthetic N(0,1))", "dense bf16 (synthetic N(0,1))", "dense bf16 (synthetic Laplace)",
                       "gpt-oss-tiny: dense", "gpt-oss-tiny: mxfp4"}
    assert all(r["gain_db"] > 0 for r in rows)
    assert by["dense bf16 (synthetic N(0,1))"]["bound_gain_db"] >= by["dense bf16 (synthetic N(0,1))"]["gain_db"] - 0.05
    table = encoder_bench.print_encoder_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| gpt-oss-tiny: mxfp4 | 4 | 64 |" in table
