"""Reliability class 6: a missing config.json, or one without the fields the plan needs."""

from __future__ import annotations

import json
from pathlib import Path

import reliability_helpers as rh


def _edit_config(src: Path, edit) -> None:
    config = json.loads((src / "config.json").read_text())
    edit(config)
    (src / "config.json").write_text(json.dumps(config))


def test_missing_config_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    (src / "config.json").unlink()
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["mxfp4-to-affine", src, out, "--quiet"], "config.json", "is missing", "model_type")


def test_config_without_model_type(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    _edit_config(src, lambda c: c.pop("model_type"))
    rh.api_refuses(src, tmp_path / "out", "config.json", "has no 'model_type'")


def test_config_without_layout_fields(tmp_path: Path) -> None:
    """The DeepSeek-V3 layout needs the layer count and attention geometry to split kv_b_proj."""
    src = rh.copy_fixture(rh.V3, tmp_path / "src")
    original = (src / "config.json").read_text()
    for k, field in enumerate(("num_hidden_layers", "num_attention_heads", "qk_nope_head_dim")):
        (src / "config.json").write_text(original)
        _edit_config(src, lambda c, f=field: c.pop(f))
        rh.api_refuses(src, tmp_path / f"out{k}", "config.json", f"has no {field!r}", "deepseek_v3 layout needs it")


def test_config_not_json_or_not_an_object(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    (src / "config.json").write_text('{"model_type": "deepseek_v41",')
    rh.api_refuses(src, tmp_path / "out", "config.json", "not valid JSON")
    (src / "config.json").write_text('["deepseek_v41"]')
    rh.api_refuses(src, tmp_path / "out2", "config.json", "must hold a JSON object")


def test_config_nested_too_deep_or_not_utf8(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    (src / "config.json").write_text('{"model_type": ' + "[" * 100_000)
    rh.api_refuses(src, tmp_path / "out", "config.json", "not valid JSON", "recursion")
    (src / "config.json").write_bytes(b'{"model_type": "deepseek_v41\xff"}')
    rh.api_refuses(src, tmp_path / "out2", "config.json", "not valid JSON", "utf-8")
