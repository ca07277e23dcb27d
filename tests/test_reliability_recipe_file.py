"""Reliability class 9: recipe files with an unknown mode, bits outside {2,3,4,5,6,8}, a group size outside
{32,64,128} or a regex that does not compile are refused before anything is written, naming the file and the
rule; a pattern that matches no module is a warning (the conversion runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reliability_helpers as rh

DEFAULT = '\n[[rules]]\nmode = "affine"\nbits = 8\n'


def _recipe(tmp_path: Path, first_rule: str, name: str = "bad.toml") -> Path:
    path = tmp_path / name
    path.write_text("[[rules]]\n" + first_rule + DEFAULT)
    return path


def test_unknown_mode_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    recipe = _recipe(tmp_path, 'match = "switch_mlp"\nmode = "affine4"\nbits = 4\n')
    out = tmp_path / "out"
    rh.cli_refuses(src, out, ["convert", src, out, "--recipe", recipe, "--quiet"], str(recipe), "rule 1", "tag 'affine4'", "expected tags")


@pytest.mark.parametrize(
    ("rule", "needles"),
    [
        ('mode = "affine"\nbits = 7\n', ("rule 1 (affine.bits)", "should be 2, 3, 4, 5, 6 or 8, got 7")),
        ('mode = "affine"\nbits = 4\ngroup_size = 48\n', ("rule 1 (affine.group_size)", "should be 32, 64 or 128, got 48")),
        ('mode = "affine"\nbits = 4\ngroup_size = 64\ngroupsize = 32\n', ("rule 1 (affine.groupsize)", "Extra inputs are not permitted")),
        ('match = "switch_mlp("\nmode = "affine"\nbits = 4\n', ("rule 1", "switch_mlp(", "not a valid regular expression")),
        ('match = "experts"\nlayers = "i < len(n)"\nmode = "affine"\nbits = 4\n', ("rule 1 (affine.layers)", "Call is not allowed")),
        ('mode = "affine"\nbits = 4\non_indivisible = "pad"\n', ("rule 1 (affine.on_indivisible)", "should be 'error' or 'keep', got 'pad'")),
    ],
    ids=["bits", "group_size", "unknown-field", "bad-regex", "bad-layers", "bad-fallback"],
)
def test_bad_rule_api(tmp_path: Path, rule: str, needles: tuple[str, ...]) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    recipe = _recipe(tmp_path, rule)
    rh.api_refuses(src, tmp_path / "out", str(recipe), *needles, recipe=recipe)


def test_recipe_not_toml_or_json(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    bad = tmp_path / "r.toml"
    bad.write_text("[[rules]\nmode = affine\n")
    rh.api_refuses(src, tmp_path / "out", str(bad), "not valid TOML", recipe=bad)
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"rules": [{"mode": "affine", "bits": 9}]}))
    rh.api_refuses(src, tmp_path / "out", str(js), "rule 1 (affine.bits)", "got 9", recipe=js)
    js.write_text(json.dumps([{"mode": "affine", "bits": 4}]))
    rh.api_refuses(src, tmp_path / "out", str(js), "must hold an object with a 'rules' list, got list", recipe=js)
    rh.api_refuses(src, tmp_path / "out", "no-such-recipe", "neither a preset", recipe="no-such-recipe")


def test_pattern_matching_nothing_warns_cli(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    recipe = _recipe(tmp_path, 'match = "swtich_mlp"\nmode = "affine"\nbits = 4\n', "typo.toml")
    out = tmp_path / "out"
    before = rh.tree_hashes(src)
    proc = rh.run_cli("convert", src, out, "--recipe", recipe, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "recipe rule match 'swtich_mlp' selects no module" in json.loads(proc.stdout)["warnings"]
    assert (out / "config.json").exists() and not rh.partial_of(out).exists()
    assert rh.tree_hashes(src) == before
    plan = rh.run_cli("plan", src, "--recipe", recipe)
    assert plan.returncode == 0 and "selects no module" in plan.stdout


def test_recipe_not_utf8_or_nested_too_deep(tmp_path: Path) -> None:
    src = rh.copy_fixture(rh.V4, tmp_path / "src")
    bad = tmp_path / "r.toml"
    bad.write_bytes(b'[[rules]]\nmode = "affine\xff"\nbits = 4\n')
    rh.api_refuses(src, tmp_path / "out", str(bad), "not valid TOML", "utf-8", recipe=bad)
    js = tmp_path / "r.json"
    js.write_text('{"rules": ' + "[" * 100_000)
    rh.api_refuses(src, tmp_path / "out", str(js), "not valid JSON", "recursion", recipe=js)
