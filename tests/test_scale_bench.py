"""`fmtconv bench` on a tiny synthetic checkpoint: DeepSeek-V4's real naming and dtypes, shapes that mlx_lm's
deepseek_v41 model expects after fmtconv's layout, the three phases, and the usual pipeline's bytes equal fmtconv's."""

from __future__ import annotations

import json
from pathlib import Path

from fmtconv.convert import bench
from fmtconv.convert.api import plan
from fmtconv.formats.safetensors_io import Checkpoint

TINY = {"hidden": 256, "moe_inter": 128, "experts": 4, "vocab": 256, "layers": 3}


def test_synthetic_checkpoint_matches_the_mlx_lm_model(tmp_path: Path) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.models import deepseek_v41

    src = bench.generate_checkpoint(tmp_path, 0, quiet=True, **TINY)
    config = json.loads((src / "config.json").read_text())
    model = deepseek_v41.Model(deepseek_v41.ModelArgs.from_dict(config))  # lazy: shapes only
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    p = plan(src, "q4q8")
    assert {t.target.name: t.shape for t in p.tensors} == expected
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
    assert bench.generate_checkpoint(tmp_path, 0, quiet=True, **TINY) == src
    assert (src / "model-00001-of-00001.safetensors").stat().st_mtime_ns == stamp


def test_default_size_is_at_least_4gb() -> None:
    config = bench.synthetic_config(4 * 10**9)
    assert bench._bytes(bench.source_specs(config)) >= 4 * 10**9
    assert config["hidden_size"] == 4096 and config["n_routed_experts"] == 64


def test_run_bench_reports_all_phases(tmp_path: Path, capsys) -> None:
    report = bench.run_bench(tmp_path, 0, True, False, shape=TINY)
    printed = json.loads(capsys.readouterr().out)
    assert printed == report
    assert set(report["phases"]) == {"fmtconv", "usual", "copy"}
    for r in report["phases"].values():
        assert r["wall_s"] > 0 and r["params_per_s"] > 0 and r["mb_per_s"] > 0 and 1e6 < r["peak_rss_mb"] * 1e6 < 4e9
        assert r["bytes_out"] == report["output_bytes"]
    assert report["fmtconv_bytes_equal_usual"] is True
    assert report["ratio_fmtconv_over_usual"] > 0 and report["ratio_fmtconv_over_copy"] > 0
    assert not (tmp_path / "runs").exists()  # outputs removed without keep
