"""The conformance check against the runtime's own model class: at full size on header-only releases, and the
differences it must report (wrong runtime, wrong bits, a renamed tensor, an integer dtype, a missing package)."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest

import release_headers as rh
from fmtconv.convert import convert, plan
from fmtconv.convert.check.conformance import check_bundle, check_plan, enforce
from fmtconv.convert.runtimes import Runtime, owner_of
from fmtconv.errors import FmtconvError
from runtime_helpers import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
V4 = FIXTURES / "deepseek-v4-flash-tiny"

_FULL_SIZE = """
import json, sys, time
sys.path.insert(0, {tests!r})
import release_headers as rh
from fmtconv.convert import plan
from fmtconv.convert.check.conformance import check_plan
t0 = time.perf_counter()
p = plan({src!r}, {recipe!r})
report = check_plan(p)
rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
quant = sorted(((t.target.module, t.mode, t.bits, t.group_size) for t in p.tensors if t.quantized))
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_kb": rss, "problems": report.problems, "skipped": report.skipped,
                  "tensors": len(p.tensors), "quantized": quant, "runtime": p.runtime, "model_module": p.model_module,
                  "dropped": p.dropped_patterns()}}))
"""


def _full_size(tmp_path: Path, config: dict, shards, recipe: str) -> dict:
    """Plan + check a header-only release in a child process: its own wall time and peak RSS (VmHWM)."""
    src = rh.write_release(tmp_path / "release", config, shards)
    code = _FULL_SIZE.format(tests=str(ROOT / "tests"), src=str(src), recipe=recipe)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_deepseek_v4_flash_full_size_q4q8_plan_passes_the_mlx_vlm_check(tmp_path):
    out = _full_size(tmp_path, rh.v4_flash_config(), rh.v4_flash_specs(), "q4q8")
    print(f"DeepSeek-V4-Flash q4q8: plan + check {out['seconds']:.1f} s, peak RSS {out['peak_kb'] / 1024:.0f} MB")
    assert out["runtime"] == "mlx-vlm" and out["model_module"] == "mlx_vlm.models.deepseek_v4"
    assert out["problems"] == [] and out["skipped"] is None
    assert out["seconds"] < 60 and out["peak_kb"] < 2 * 1024 * 1024  # typically 2-5 s and under 200 MB
    quant = [tuple(q) for q in out["quantized"]]
    experts = [q for q in quant if ".ffn.switch_mlp." in q[0]]
    assert len(experts) == 43 * 3 and {q[1:] for q in experts} == {("affine", 4, 64)}
    assert {q[1:] for q in quant if q not in experts} == {("affine", 8, 64)}
    assert out["dropped"] and all(k.startswith("mtp.") for k in out["dropped"])


def test_step3p7_flash_full_size_dq4_plan_is_the_published_table(tmp_path):
    """../shared/releases/README.md: 530 quantized matrices, 4-bit x232, 5-bit x16, 6-bit x4, 8-bit x278, group 64,
    at `language_model.model.layers.{i}.` (routed and shared experts 4-bit; their down_proj 6-bit in the first 5
    layers and 5-bit every 5th layer; attention, router, dense MLPs, embed_tokens and lm_head 8-bit)."""
    out = _full_size(tmp_path, rh.step3p7_flash_config(), rh.step3p7_flash_specs(), "dq4")
    print(f"Step-3.7-Flash dq4: plan + check {out['seconds']:.1f} s, peak RSS {out['peak_kb'] / 1024:.0f} MB")
    assert out["problems"] == [] and out["skipped"] is None and out["model_module"] == "mlx_vlm.models.step3p7"
    assert out["seconds"] < 60 and out["peak_kb"] < 2 * 1024 * 1024  # typically 2-5 s and under 200 MB
    quant = [tuple(q) for q in out["quantized"]]
    assert len(quant) == 530 and Counter(q[2] for q in quant) == {4: 232, 5: 16, 6: 4, 8: 278}
    assert {(q[1], q[3]) for q in quant} == {("affine", 64)}
    assert all(q[0].startswith("language_model.model.layers.") for q in quant
               if q[0] not in ("language_model.model.embed_tokens", "language_model.lm_head"))

    def bits(layer: int, module: str) -> int:
        return next(q[2] for q in quant if q[0] == f"language_model.model.layers.{layer}.{module}")

    assert bits(3, "mlp.switch_mlp.down_proj") == bits(4, "mlp.share_expert.down_proj") == 6
    assert bits(10, "mlp.switch_mlp.down_proj") == bits(40, "mlp.share_expert.down_proj") == 5
    assert bits(11, "mlp.switch_mlp.down_proj") == bits(11, "mlp.share_expert.up_proj") == 4
    assert bits(11, "mlp.gate.gate") == bits(1, "mlp.down_proj") == bits(44, "self_attn.g_proj") == 8
    assert not any("vision_model" in q[0] or "vit_large_projector" in q[0] for q in quant)


def test_the_v41_mlx_lm_layout_for_a_deepseek_v4_config_is_refused_before_writing(tmp_path):
    """The founding failure: overrides keyed for another runtime's module tree. Nothing is written."""
    with pytest.raises(FmtconvError, match="mlx-lm .* has no model for model_type 'deepseek_v4'"):
        convert(V4, tmp_path / "out", recipe="q4q8", family="deepseek_v41")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.fixture(scope="module")
def v4_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("conf") / "v4"
    convert(V4, out, recipe="q4q8", kernel_backend="cpu")
    return out


def _copy(bundle: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(bundle, dst)
    return dst


def test_a_bundle_with_wrong_overrides_lists_every_difference(v4_bundle, tmp_path):
    bad = _copy(v4_bundle, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    q = config["quantization"]
    experts = [k for k in q if isinstance(q[k], dict) and ".switch_mlp." in k]
    for k in experts:  # the overrides vanish: the runtime would read the 4-bit experts at the 8-bit default
        del q[k]
    (bad / "config.json").write_text(json.dumps(config))
    report = check_bundle(bad, "mlx-vlm")
    assert len(experts) == 9 and len(report.problems) == 9
    assert all(".switch_mlp." in p and ".weight: shape" in p for p in report.problems)  # 4-bit words read as 8-bit
    with pytest.raises(FmtconvError, match=r"does not match mlx_vlm.models.deepseek_v4 \(mlx-vlm\): 9 difference"):
        enforce(report)
    run = subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", "verify", str(bad), "--runtime"], capture_output=True, text=True)
    assert run.returncode == 1 and "runtime check: 9 difference(s) against mlx_vlm.models.deepseek_v4" in run.stdout


def test_names_and_integer_dtypes_are_compared(v4_bundle, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    bad = _copy(v4_bundle, tmp_path / "bad")
    shard = next(bad.glob("model-*.safetensors"))
    tensors = load_file(str(shard))
    key = "language_model.model.layers.0.ffn.gate.weight"
    tensors[key] = tensors[key].astype(np.float32)  # the runtime casts the router to the model dtype
    tid = "language_model.model.layers.0.ffn.gate.tid2eid"
    tensors[tid] = tensors[tid].astype(np.float32)  # a hash table of floats
    tensors["language_model.model.layers.0.attn.wq_a.wrong"] = tensors.pop("language_model.model.layers.0.attn.q_norm.weight")
    save_file(tensors, str(shard), metadata={"format": "mlx"})
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: shard.name for k in tensors}
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    problems = check_bundle(bad, "mlx-vlm").problems
    assert f"tensor {key}: dtype float32, the runtime casts it to the model dtype bfloat16" in problems
    assert not any(tid in p for p in problems)  # compared after the runtime's sanitize, which casts it to int32
    assert any(p.startswith("missing tensor language_model.model.layers.0.attn.q_norm.weight") for p in problems)
    assert any(p.startswith("tensor language_model.model.layers.0.attn.wq_a.wrong") for p in problems)


def test_intent_differences_and_config_keys(v4_bundle):
    from fmtconv.convert.check.conformance import plan_intent

    intent = plan_intent(plan(V4, "q4q8"))
    assert check_bundle(v4_bundle, "mlx-vlm", intent).ok
    key = "language_model.model.layers.1.ffn.switch_mlp.up_proj"
    wrong = dict(intent, **{key: ("affine", 3, 64)})
    assert f"module {key}: written 3-bit affine group 64, the runtime loads it as 4-bit affine group 64" in \
        check_bundle(v4_bundle, "mlx-vlm", wrong).problems


def test_a_missing_runtime_is_said_not_silently_passed(v4_bundle):
    report = check_bundle(v4_bundle, Runtime("mlx-nowhere", "mlx_nowhere"))
    assert report.skipped and "mlx-nowhere is not installed" in report.skipped and not report.problems
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        enforce(report)
    assert any("mlx-nowhere is not installed" in str(w.message) for w in seen)


def test_plan_and_card_name_the_runtime(v4_bundle):
    p = plan(V4, "q4q8")
    assert (p.runtime, p.model_module) == ("mlx-vlm", "mlx_vlm.models.deepseek_v4")
    assert p.to_json()["runtime"] == "mlx-vlm" and check_plan(p).ok
    card = (v4_bundle / "README.md").read_text()
    assert "| Runtime | mlx-vlm (`mlx_vlm.models.deepseek_v4`)" in card and ": passed |" in card
    assert "from mlx_vlm import generate, load" in card
    assert owner_of("deepseek_v4").name == owner_of("step3p7").name == "mlx-vlm" and owner_of("qwen3_moe").name == "mlx-lm"


def test_runtime_for_a_model_it_lacks_is_refused():
    with pytest.raises(FmtconvError, match="no mlx-lm layout for model_type 'step3p7'"):
        plan(FIXTURES / "step3p7-nvfp4-tiny", "q4q8", runtime="mlx-lm")
