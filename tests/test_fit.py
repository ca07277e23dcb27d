"""`--fit SIZE` / `--target-bpw X`: the solve, end to end on fixtures (the bundle fits, loads in its runtime with the
recipe's bits and passes the logits gate), the cache, constraints, the published V4 preset, and bad input."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys

import pytest

import release_headers as rh
from fmtconv.convert import convert, plan
from fmtconv.convert.api import eval_tokens
from fmtconv.convert.fit.allocate import FIT_RECIPE_FILE
from fmtconv.convert.fit.solve import Option, solve
from fmtconv.convert.recipes import PRESETS, load_recipe, recipe_from_dict
from fmtconv.errors import FmtconvError
from runtime_helpers import CLIENTS, FIXTURES, baseline_model, load_bundle, logits, module_settings, rel_rms, tokens_for


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", *map(str, args)], capture_output=True, text=True)


def test_solve_finds_the_exhaustive_optimum_within_budget():
    rng = random.Random(7)
    for _ in range(300):
        options = {f"u{i}": [Option(j, rng.randint(1, 50) * rng.choice([1, 997, 100003]), rng.random())
                             for j in range(rng.randint(1, 5))] for i in range(rng.randint(1, 5))}
        least = sum(min(o.nbytes for o in v) for v in options.values())
        budget = rng.randint(least, sum(max(o.nbytes for o in v) for v in options.values()))
        chosen = solve(options, budget)
        assert sum(o.nbytes for o in chosen.values()) <= budget
        best = min(sum(o.cost for o in combo) for combo in itertools.product(*options.values())
                   if sum(o.nbytes for o in combo) <= budget)
        assert sum(o.cost for o in chosen.values()) <= best * (1 + 1e-9) + 1e-12


def test_solve_refuses_a_budget_below_the_smallest_choice():
    with pytest.raises(ValueError, match="smallest choice takes 5 bytes"):
        solve({"a": [Option(0, 3, 1.0)], "b": [Option(0, 2, 0.5), Option(1, 9, 0.1)]}, 4)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("fit-cache")


# One fixture per runtime model family shape: mlx-lm MoE (two), mlx-vlm DeepSeek-V4-Flash, mlx-vlm vision-language.
@pytest.mark.parametrize("name,by", [("gpt-oss-tiny", "fit"), ("qwen3-moe-fp8-tiny", "fit"),
                                     ("deepseek-v4-flash-tiny", "bpw"), ("step3p7-nvfp4-tiny", "fit")])
def test_fit_to_a_presets_size_loads_and_passes_the_gate(name, by, cache, tmp_path):
    fixture = FIXTURES / name
    preset = plan(fixture, "mixed_3_6")
    budget = preset.total_bytes if by == "fit" else int(4.0 * preset.total_params / 8)
    tokens = eval_tokens(fixture, [fixture], n_tokens=128, seq_len=64)
    out = tmp_path / "fit"
    size = {"fit": budget} if by == "fit" else {"target_bpw": 4.0}
    summary = convert(fixture, out, recipe=None, fit_tokens=tokens, fit_cache=cache, kernel_backend="cpu", **size)
    assert summary["bytes_out"] <= budget
    config = json.loads((out / "config.json").read_text())
    assert config["fmtconv"]["fit"]["budget_bytes"] == budget and config["fmtconv"]["fit"]["planned_bytes"] <= budget
    assert "| Allocation | fmtconv `--fit`" in (out / "README.md").read_text()
    # The written recipe reproduces the allocation exactly.
    again = plan(fixture, load_recipe(out / FIT_RECIPE_FILE), kernel_backend="cpu")
    assert again.total_bytes == summary["bytes_out"]
    model = load_bundle(out, CLIENTS[name][0])
    settings = module_settings(model)
    intent = {t.target.module: {"bits": t.bits, "group_size": t.group_size, "mode": t.mode} for t in again.tensors if t.quantized}
    assert settings == intent
    ids = tokens_for(fixture)
    ref = logits(CLIENTS[name][1](fixture), ids)
    err, base = rel_rms(logits(model, ids), ref), rel_rms(logits(baseline_model(fixture, settings), ids), ref)
    print(f"{name}: fit to {budget} bytes -> {summary['bytes_out']}; logits rel RMS {err:.4f}, baseline {base:.4f}")
    assert err <= 1.25 * base
    # A second fit at another size reuses the measured sensitivities.
    bigger = plan(fixture, "q4q8").total_bytes
    p = plan(fixture, None, fit=bigger, fit_tokens=tokens, fit_cache=cache, kernel_backend="cpu")
    assert p.fit["measured"] is False and p.total_bytes <= bigger


def test_target_bpw_and_constraints(cache):
    fixture = FIXTURES / "qwen3-moe-fp8-tiny"
    tokens = eval_tokens(fixture, [fixture], n_tokens=128, seq_len=64)
    pin = recipe_from_dict({"name": "pin-router", "rules": [{"match": r"mlp\.gate$", "mode": "affine", "bits": 8}]})
    p = plan(fixture, pin, target_bpw=4.5, fit_tokens=tokens, fit_cache=cache, kernel_backend="cpu")
    assert p.bits_per_weight <= 4.5
    routers = [t for t in p.tensors if t.target.module.endswith("mlp.gate")]
    assert routers and all(t.bits == 8 and t.group_size == 64 for t in routers)
    assert p.recipe.rules[0].match == r"mlp\.gate$"  # constraints first, then the allocation


def test_bad_budgets_are_refused_before_anything_is_written(cache, tmp_path):
    fixture = FIXTURES / "qwen3-moe-fp8-tiny"
    tokens = eval_tokens(fixture, [fixture], n_tokens=64, seq_len=64)
    with pytest.raises(FmtconvError, match=r"below the smallest bundle fmtconv can plan for this source: \d+ bytes"):
        plan(fixture, None, fit=1000, fit_tokens=tokens, fit_cache=cache)
    with pytest.raises(FmtconvError, match="--fit SIZE or --target-bpw X, not both"):
        plan(fixture, None, fit=10**6, target_bpw=4.0, fit_tokens=tokens)
    keep_all = recipe_from_dict({"name": "keep-all", "rules": [{"mode": "keep"}]})
    with pytest.raises(FmtconvError, match="the recipe 'keep-all' alone takes .* over the budget"):
        plan(fixture, keep_all, fit=plan(fixture, "mixed_3_6").total_bytes, fit_tokens=tokens, fit_cache=cache)
    run = _cli("convert", fixture, tmp_path / "out", "--fit", "1KB", "--fit-cache", cache, "--n-tokens", "64")
    assert run.returncode == 2 and "fmtconv: error:" in run.stderr and "smallest bundle" in run.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    run = _cli("plan", fixture, "--fit", "1MB", "--target-bpw", "4")
    assert run.returncode == 2 and "not allowed with argument" in run.stderr


def test_the_published_v4_q3_preset_at_full_size(tmp_path):
    """The published DeepSeek-V4-Flash Q3 bundle: 135.3 GB, 3.808 bits per weight at group 128."""
    src = rh.write_release(tmp_path / "release", rh.v4_flash_config(), rh.v4_flash_specs())
    p = plan(src, "v4_q3")
    assert p.total_bytes == pytest.approx(135.3e9, rel=0.01) and p.bits_per_weight == pytest.approx(3.808, rel=0.01)
    low = {t.target.module for t in p.tensors if t.quantized and t.bits <= 3}
    assert low and all("switch_mlp" in m for m in low)  # attention, compressor, indexer, shared experts: 6-bit


@pytest.mark.parametrize("preset", list(PRESETS))
def test_group_size_applies_to_every_preset(preset):
    p = plan(FIXTURES / "deepseek-v4-flash-tiny", preset, group_size=128)
    affine = [t for t in p.tensors if t.quantized and t.mode == "affine" and t.route != "exact-affine"]
    assert all(t.group_size == 128 for t in affine)


def test_the_fit_bench_judges_on_tokens_held_out_from_the_sensitivity_pass():
    from fmtconv.convert.api import calibration_and_held_out

    calibration, held_out = calibration_and_held_out(FIXTURES / "qwen3-moe-fp8-tiny", 128, 64)
    assert calibration.count == held_out.count == 128 and calibration.sequences != held_out.sequences
    assert "held out" in held_out.source


# mlx-lm's DeepSeek-V4 (deepseek-v4-tiny) keeps a window cache and state shared between layers within one forward.
@pytest.mark.parametrize("name", ["qwen3-moe-fp8-tiny", "deepseek-v4-tiny"])
def test_forks_in_several_passes_measure_what_one_pass_does(name):
    """The forked copies run in passes of bounded logits memory; cut into one fork a pass, the table is the same."""
    from fmtconv.convert.fit import sensitivity as sens
    from fmtconv.convert.fit.candidates import KEEP, REFERENCE, units_of
    from fmtconv.convert.plan import build_plan

    fixture = FIXTURES / name
    tokens = eval_tokens(fixture, [fixture], n_tokens=64, seq_len=32)
    settings = {"compute_dtype": None, "kernel_backend": "cpu", "rounding": "mlx-lm"}
    keep_plan = build_plan(fixture, recipe_from_dict({"name": "keep", "rules": [{"mode": "keep"}]}), **settings)
    units, _ = units_of(keep_plan)
    cands = {u.key: [c for c in u.candidates() if c in (REFERENCE, KEEP) or (c.bits == 2 and c.group_size == 64)]
             for u in units}
    one = sens.measure(fixture, keep_plan, units, cands, tokens, settings)
    assert len(sens.fork_passes(list(range(8)) + ["embedding"], 10, budget=25)) == 9
    many = sens.measure(fixture, keep_plan, units, cands, tokens, settings, fork_bytes=1)
    assert many.gains.keys() == one.gains.keys() and len(one.gains) > 2
    for f, g in one.gains.items():
        assert many.gains[f] == pytest.approx(g, rel=1e-4)
    for u, cs in one.costs.items():
        for c, v in cs.items():
            assert many.costs[u][c] == pytest.approx(v, rel=1e-4, abs=1e-12)
    assert many.kl_reference == pytest.approx(one.kl_reference, rel=1e-5)


def test_the_drafter_counts_in_the_budget_and_the_written_recipe_reproduces_both(cache, tmp_path):
    fixture = FIXTURES / "deepseek-v4-flash-tiny"
    tokens = eval_tokens(fixture, [fixture], n_tokens=128, seq_len=64)  # the end-to-end test's: its cached sensitivities
    preset = plan(fixture, "mixed_3_6", mtp=True, kernel_backend="cpu")
    budget = preset.bytes_with_drafter
    p = plan(fixture, fit=budget, mtp=True, fit_tokens=tokens, fit_cache=cache, kernel_backend="cpu")
    assert p.drafter is not None and p.drafter.total_bytes > 0
    assert p.total_bytes < p.bytes_with_drafter <= budget and p.fit["planned_bytes"] == p.bytes_with_drafter
    (tmp_path / "fit.toml").write_text(p.fit["recipe_toml"])
    again = plan(fixture, load_recipe(tmp_path / "fit.toml"), mtp=True, kernel_backend="cpu")
    targets = lambda q: [(t.target.name, t.mode, t.bits, t.group_size) for t in q.tensors]  # noqa: E731
    assert targets(again) == targets(p) and targets(again.drafter) == targets(p.drafter)


def test_convert_fit_eval_judges_the_bundle_on_tokens_the_fit_did_not_measure(cache, tmp_path):
    fixture = FIXTURES / "qwen3-moe-fp8-tiny"
    out = tmp_path / "out"
    run = _cli("convert", fixture, out, "--fit", plan(fixture, "q4q8").total_bytes, "--fit-cache", cache, "--eval",
               "--n-tokens", "64", "--seq-len", "32", "--kernel-backend", "cpu", "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)["eval"]
    assert report["tokens"] == 64 and "held out: the 64 tokens after the fit's calibration tokens" in report["tokens_source"]
