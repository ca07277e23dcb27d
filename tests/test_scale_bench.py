"""`fmtconv bench` on tiny synthetic checkpoints: DeepSeek-V4's and DeepSeek-V3's real naming and dtypes, shapes
that mlx_lm's models expect after fmtconv's layouts, every phase, and the byte comparisons (fmtconv vs the usual
pipeline on V4, fmtconv fp8-to-affine vs mlx_lm.convert on V3, 1 core vs all)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmtconv.convert.bench import data as bench_data
from fmtconv.convert.bench import runner as bench
from fmtconv.convert.api import plan
from fmtconv.convert.recipes import source_recipe
from fmtconv.formats.safetensors_io import Checkpoint

TINY = {"hidden": 256, "moe_inter": 128, "experts": 4, "vocab": 256, "layers": 3}
TINY_V3 = {"hidden": 256, "moe_inter": 128, "experts": 4, "vocab": 256, "q_lora": 128, "kv_lora": 128, "layers": 3}


def _mlx_lm_shapes(config: dict, module) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten

    model = module.Model(module.ModelArgs.from_dict(config))  # lazy: shapes only
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def test_synthetic_checkpoint_matches_the_mlx_lm_model(tmp_path: Path) -> None:
    from mlx_lm.models import deepseek_v41

    src = bench_data.generate_checkpoint(tmp_path, 0, quiet=True, **TINY)
    config = json.loads((src / "config.json").read_text())
    p = plan(src, "q4q8")
    assert {t.target.name: t.shape for t in p.tensors} == _mlx_lm_shapes(config, deepseek_v41)
    assert not p.dropped and not p.warnings
    with Checkpoint(src) as ck:
        dtypes = {n: i.dtype for n, i in ck.tensors.items()}
    assert dtypes["layers.0.ffn.experts.3.w2.weight"] == "I8" and dtypes["layers.0.ffn.experts.3.w2.scale"] == "F8_E8M0"
    assert dtypes["layers.1.attn.wq_b.weight"] == "F8_E4M3" and dtypes["layers.1.attn.wq_b.scale"] == "F8_E8M0"
    assert dtypes["layers.0.ffn.shared_experts.w1.weight"] == "F8_E4M3"
    assert dtypes["embed.weight"] == dtypes["head.weight"] == dtypes["layers.0.ffn.gate.weight"] == "BF16"
    assert dtypes["layers.0.hc_attn_fn"] == dtypes["layers.0.attn.attn_sink"] == dtypes["layers.0.ffn.gate.bias"] == "F32"
    # Reused, not regenerated, for the same size and shape.
    stamp = (src / "model-00001-of-00001.safetensors").stat().st_mtime_ns
    assert bench_data.generate_checkpoint(tmp_path, 0, quiet=True, **TINY) == src
    assert (src / "model-00001-of-00001.safetensors").stat().st_mtime_ns == stamp


def test_synthetic_v3_checkpoint_matches_the_mlx_lm_model(tmp_path: Path) -> None:
    from mlx_lm.models import deepseek_v3

    src = bench_data.generate_v3_checkpoint(tmp_path, 0, quiet=True, **TINY_V3)
    config = json.loads((src / "config.json").read_text())
    p = plan(src, source_recipe(4, 64, ("fp8_block",), "v3", other_bits=4))
    assert {t.target.name: t.shape for t in p.tensors} == _mlx_lm_shapes(config, deepseek_v3)
    assert {t.bits for t in p.tensors if t.route == "requant"} == {4}
    with Checkpoint(src) as ck:
        dtypes = {n: i.dtype for n, i in ck.tensors.items()}
    assert dtypes["model.layers.1.mlp.experts.2.down_proj.weight"] == "F8_E4M3"
    assert dtypes["model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"] == "F32"
    assert dtypes["model.embed_tokens.weight"] == dtypes["lm_head.weight"] == "BF16"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert (src / "tokenizer.json").exists()


def test_default_sizes_are_at_least_the_request() -> None:
    for size in (4 * 10**9, 8 * 10**9):
        config = bench_data.synthetic_config(size)
        assert bench_data.spec_bytes(bench_data.source_specs(config)) >= size
        assert config["hidden_size"] == 4096 and config["n_routed_experts"] == 64
        v3 = bench_data.v3_config(size)
        assert bench_data.spec_bytes(bench_data.v3_specs(v3)) >= size and v3["hidden_size"] == 4096


def test_run_bench_reports_every_phase(tmp_path: Path, capsys) -> None:
    report = bench.run_bench(tmp_path, 0, True, False, shape=TINY, v3_shape=TINY_V3)
    printed = json.loads(capsys.readouterr().out)
    assert printed == report
    names = {"fmtconv", "fmtconv_metal", "usual", "copy", "v3_fmtconv", "v3_mlx_lm"}
    assert names <= set(report["phases"]) and "fmtconv_cores_1" in report["phases"]
    for name, r in report["phases"].items():
        assert r["wall_s"] > 0 and r["params_per_s"] > 0 and r["mb_per_s"] > 0 and 1e6 < r["peak_rss_mb"] * 1e6 < 4e9
        if not name.startswith("v3"):
            assert r["bytes_out"] == report["output_bytes"]
    for name in ("fmtconv", "fmtconv_metal", "v3_fmtconv", "v3_mlx_lm", "fmtconv_cores_1"):
        assert report["phases"][name]["command"].startswith(("fmtconv ", "mlx_lm.convert "))
    assert report["fmtconv_bytes_equal_usual"] is True
    assert report["v3_bytes_identical"] is True
    assert report["thread_scaling"]["bytes_identical_to_all_core_run"] is True
    assert report["thread_scaling"]["output_on"] in ("tmpfs", "disk")
    assert all(r["cpu_s"] > 0 and r["cpu_s"] == pytest.approx(r["cpu_user_s"] + r["cpu_sys_s"], abs=0.02)
               for r in report["phases"].values())
    assert isinstance(report["phases"]["fmtconv"]["kernels"], dict)  # what the run compiled or loaded (none: too small)
    for key in ("ratio_fmtconv_over_usual", "ratio_fmtconv_over_copy", "ratio_fmtconv_metal_over_copy",
                "ratio_v3_fmtconv_over_mlx_lm", "copy_mb_per_s", "fmtconv_peak_rss_mb"):
        assert report[key] > 0, key
    assert {t["key"] for t in report["targets"]} >= {"ratio_fmtconv_over_copy", "ratio_v3_fmtconv_over_mlx_lm"}
    assert report["load_avg_before"] is not None and report["machine"]["versions"]["numba"]
    assert not (tmp_path / "runs").exists()  # outputs removed without keep


def test_two_sizes_report_scaling_and_repeats_take_the_median(tmp_path: Path, capsys) -> None:
    small = dict(TINY, layers=2)
    report = bench.run_bench(tmp_path, [0, 1], True, False, phases=("copy",), repeat=3, cold=True, shape=small,
                             discard_data=True)
    capsys.readouterr()
    assert not any(Path(r["checkpoint"]).exists() for r in report["runs"])  # --discard-data
    assert {r["page_cache"] for r in report["runs"]} <= {"cold", "warm"}
    for run in report["runs"]:
        walls = run["phases"]["copy"]["repeats_wall_s"]
        assert len(walls) == 3 and run["phases"]["copy"]["wall_s"] == sorted(walls)[1]
    # shape fixes the layer count, so both sizes are the same checkpoint: ratios near 1, the structure is what counts
    assert len(report["runs"]) == 2 and set(report["scaling"]["phases"]) == {"copy"}
    assert report["scaling"]["size_ratio"] == 1.0


def test_first_run_and_scaling_targets() -> None:
    report: dict = {}
    compiled = {"mxfp4": {"seconds": 3.0, "compiled": True}, "fp8_e8m0": {"seconds": 0.01, "compiled": False}}
    bench.first_run(report, [{"wall_s": 12.0, "kernels": compiled}, {"wall_s": 10.0}, {"wall_s": 11.0}])
    assert report["ratio_first_run_over_later"] == round(12 / 10.5, 3) and report["first_run"]["compiled_kernels"] == ["mxfp4"]
    assert report["first_run"]["compile_s"] == 3.0
    assert next(t for t in bench.check_targets(report) if t["key"] == "ratio_first_run_over_later")["met"] is False
    warm: dict = {}  # nothing compiled: a slower first run is the page cache's doing, not judged
    bench.first_run(warm, [{"wall_s": 12.0, "kernels": {}}, {"wall_s": 10.0}, {"wall_s": 11.0}])
    assert "ratio_first_run_over_later" not in warm and warm["first_run"]["ratio_over_later"] == round(12 / 10.5, 3)
    runs = [{"source_bytes": 4, "phases": {"fmtconv": {"wall_s": 10.0, "peak_rss_mb": 400.0}}},
            {"source_bytes": 8, "phases": {"fmtconv": {"wall_s": 19.0, "peak_rss_mb": 410.0}}}]
    (target,) = bench.scaling_report(runs)["targets"]
    assert target["value"] == 0.95 and target["met"] is True


def test_a_failing_phase_is_recorded_and_the_others_run(tmp_path: Path, monkeypatch, capsys) -> None:
    real = bench.run_phase_in_child

    def flaky(phase, kwargs, **kw):
        if phase == "mlx_lm":
            raise RuntimeError("bench phase 'mlx_lm' failed with exit code -9")
        return real(phase, kwargs, **kw)

    monkeypatch.setattr(bench, "run_phase_in_child", flaky)
    report = bench.run_bench(tmp_path, 0, True, False, phases=("v3",), v3_shape=TINY_V3)
    capsys.readouterr()
    assert "wall_s" in report["phases"]["v3_fmtconv"]
    assert report["phases"]["v3_mlx_lm"]["error"].endswith("-9")
    assert report["v3_bytes_identical"] is None and "ratio_v3_fmtconv_over_mlx_lm" not in report
    assert next(t for t in report["targets"] if t["key"] == "ratio_v3_fmtconv_over_mlx_lm")["met"] is None


def test_mse_phase_reports_its_cost_over_minmax(tmp_path: Path, capsys) -> None:
    report = bench.run_bench(tmp_path, 0, True, False, phases=("fmtconv", "mse"), shape=dict(TINY, layers=2))
    capsys.readouterr()
    assert report["phases"]["mse"]["command"].endswith("--encoder mse")
    assert report["phases"]["mse"]["bytes_out"] == report["output_bytes"]  # same format, same bytes on disk
    assert report["ratio_mse_over_minmax"] > 0
