"""`--mtp`: the release's multi-token-prediction layer as a drafter bundle for mlx-vlm's speculative decoding.

DeepSeek-V4-Flash's `mtp.0.*` goes through the same plan, recipe, codecs and checks as the main model into
mlx-vlm's deepseek_v4_mtp drafter layout; the real runtime loads it, its logits pass the 1.25x gate against the
drafter of the independently decoded weights, and greedy speculative decoding with it is token for token plain
greedy decoding (`pytest -s` prints the acceptance rate).  GLM-4.7-Flash's drafter is refused while mlx-vlm has no
model class for it (its names are still checked against mlx-vlm's own splitter), every other family is refused,
and so is a source without an MTP layer, before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import release_headers as rh
import reliability_helpers as rel
from fmtconv.convert import convert, plan
from fmtconv.convert.check.conformance import check_plan
from fmtconv.convert.layouts.glm4_moe_lite_mtp import Glm4MoeLiteMtpLayout
from fmtconv.convert.plan import target_shape
from fmtconv.convert.runtimes import runtime_named
from fmtconv.formats.grouping import find_groups
from fmtconv.formats.safetensors_io import Checkpoint
from runtime_helpers import FIXTURES, fd, fl, module_settings, rel_rms

V4 = FIXTURES / "deepseek-v4-flash-tiny"
GLM = FIXTURES / "glm4-moe-lite-fp8-tiny"
N_TOKENS = 32
# A recipe file whose rules name the drafter's own module paths (and one the main model's).
RECIPE = """
[[rules]]
match = "^decoder\\\\.ffn\\\\.switch_mlp"
mode = "affine"
bits = 3
group_size = 32

[[rules]]
match = "^(e_proj|h_proj)$"
mode = "affine"
bits = 6

[[rules]]
match = "switch_mlp"
mode = "affine"
bits = 4

[[rules]]
mode = "affine"
bits = 8
"""


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The V4-Flash fixture converted once with q4q8 and --mtp: (OUT, OUT-mtp, the run summary)."""
    out = tmp_path_factory.mktemp("mtp") / "v4"
    summary = convert(V4, out, recipe="q4q8", kernel_backend="cpu", mtp=True)
    return out, out.with_name("v4-mtp"), summary


def test_the_drafter_bundle_is_mlx_vlms_deepseek_v4_mtp_layout_checked_before_the_rename(bundles):
    out, draft, summary = bundles
    d = summary["drafter"]
    assert d["output"] == str(draft) and [c["ok"] for c in d["conformance"]] == [True, True]
    assert {c["model_module"] for c in d["conformance"]} == {"mlx_vlm.speculative.drafters.deepseek_v4_mtp"}
    config = json.loads((draft / "config.json").read_text())
    assert config["model_type"] == "deepseek_v4_mtp" and config["block_size"] == 2
    assert config["text_config"]["hidden_size"] == 128 and "quantization_config" not in config["text_config"]
    assert config["fmtconv"]["draft_kind"] == "mtp" and config["fmtconv"]["runtime_check"]["result"] == "passed"
    q = config["quantization"]  # explicit: every quantized module by the drafter's own path
    modules = {k for k, v in q.items() if isinstance(v, dict)}
    assert modules == {"e_proj", "h_proj", *(f"decoder.attn.{w}" for w in ("wq_a", "wq_b", "wkv", "wo_a", "wo_b")),
                       *(f"decoder.ffn.{m}.{p}" for m in ("switch_mlp", "shared_experts") for p in ("gate_proj", "up_proj", "down_proj"))}
    index = json.loads((draft / "model.safetensors.index.json").read_text())["weight_map"]
    assert "decoder.attn.wo_a.weight" in index and "hc_head.fn" in index and not any(k.startswith("mtp.") for k in index)
    main_index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith(("mtp.", "e_proj", "decoder.")) for k in main_index)
    card = (draft / "README.md").read_text()
    assert "python -m mlx_vlm generate --model path/to/v4 --draft-model path/to/this/folder --draft-kind mtp" in card
    assert 'load_drafter("path/to/this/folder", kind="mtp")' in card
    assert "--draft-model path/to/v4-mtp --draft-kind mtp" in (out / "README.md").read_text()
    assert not list(out.parent.glob("*.partial"))
    run = rel.run_cli("verify", draft, "--source", V4, "--runtime")  # read back from the source's mtp.0.*, and re-checked
    assert run.returncode == 0, run.stdout + run.stderr
    assert "decoder.ffn.switch_mlp.up_proj" in run.stdout and "mlx_vlm.speculative.drafters.deepseek_v4_mtp (mlx-vlm) loads all" in run.stdout


def test_the_drafter_loads_in_mlx_vlm_and_its_logits_pass_the_gate(bundles):
    """Against the drafter of the decoded source (fixture_lib's decoder, not fmtconv), float32; the baseline is that
    drafter cast like the bundle and quantized by nn.quantize at the bundle's own per-module settings."""
    from mlx_vlm.speculative.drafters import load_drafter

    _, draft_dir, _ = bundles
    drafter, kind = load_drafter(str(draft_dir), kind="mtp")
    assert kind == "mtp" and type(drafter).__name__ == "DeepseekV4MTPDraftModel"
    settings = module_settings(drafter)
    config = json.loads((draft_dir / "config.json").read_text())
    assert settings == {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}
    main = fl.reference_vlm_model(V4)  # embedding and head, shared by all three
    reference = fd.reference_drafter(V4)
    baseline = fd.reference_drafter(V4)
    kept = ("attn_sink", "e_score_correction_bias", "_hc.", "hc_head.")  # float32 in the release, as in the bundle
    baseline.load_weights([(k, v if any(s in k for s in kept) else v.astype(mx.bfloat16)) for k, v in tree_flatten(baseline.parameters())])
    nn.quantize(baseline, class_predicate=lambda p, m: settings.get(p, False) if hasattr(m, "to_quantized") else False)
    rng = np.random.default_rng(3)
    tokens = mx.array(rng.integers(3, 120, (1, 24)).astype(np.int32))
    hidden = mx.array(rng.standard_normal((1, 24, 4, 128)).astype(np.float32))  # [batch, tokens, hc_mult, hidden]

    def logits(d) -> np.ndarray:
        d.set_dtype(mx.float32)
        d.reset(main)
        h, _ = d._forward_tokens(tokens, hidden, mx.int32)
        return np.array(d._lm_head_fn(h).astype(mx.float32))[0]

    ref = logits(reference)
    got, base = logits(drafter), logits(baseline)
    err, base_err = rel_rms(got, ref), rel_rms(base, ref)
    print(f"deepseek-v4-flash-tiny drafter q4q8: logits rel RMS {err:.4f}, baseline {base_err:.4f}, "
          f"top-1 {(got.argmax(-1) == ref.argmax(-1)).mean():.3f}")
    assert np.isfinite(got).all() and err <= 1.25 * base_err, (err, base_err)


def test_speculative_decoding_with_the_drafter_is_greedy_decoding_token_for_token(bundles):
    from mlx_vlm.generate import generate_step
    from mlx_vlm.speculative.drafters import load_drafter
    from mlx_vlm.utils import load_model

    out, draft_dir, _ = bundles
    model = load_model(out)
    drafter, kind = load_drafter(str(draft_dir), kind="mtp")
    prompt = mx.array([[int(t) for t in np.random.default_rng(7).integers(3, 120, 12)]])
    plain = [int(t) for t, _ in generate_step(prompt, model, None, None, max_tokens=N_TOKENS, temperature=0.0)]
    spec = [int(t) for t, _ in generate_step(prompt, model, None, None, max_tokens=N_TOKENS, temperature=0.0,
                                             draft_model=drafter, draft_kind=kind)]
    rounds, accepted, drafted = drafter.speculative_total_rounds, drafter.speculative_total_accepted, drafter.speculative_total_drafted
    print(f"deepseek-v4-flash-tiny q4q8 + drafter: {N_TOKENS} greedy tokens equal: {spec == plain}; acceptance "
          f"{accepted:.0f}/{drafted:.0f} drafted tokens ({accepted / max(drafted, 1):.1%}) over {rounds} rounds "
          "(random fixture weights: the drafter has nothing to predict the main model with)")
    assert len(plain) == N_TOKENS and spec == plain
    assert rounds > 0 and drafted > 0


def test_a_recipe_file_rules_the_drafter_by_its_module_paths_and_the_plan_counts_its_bytes(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE)
    p = plan(V4, recipe, mtp=True)
    d = p.drafter
    bits = {t.target.module: (t.bits, t.group_size) for t in d.tensors if t.quantized}
    assert bits["decoder.ffn.switch_mlp.down_proj"] == (3, 32) and bits["e_proj"] == bits["h_proj"] == (6, 64)
    assert bits["decoder.attn.wq_a"] == (8, 64)
    assert {(t.bits, t.group_size) for t in p.tensors if ".switch_mlp." in t.target.module} == {(4, 64)}
    assert p.bytes_with_drafter == p.total_bytes + d.total_bytes and d.total_bytes > 0
    assert not p.warnings  # the drafter-only rules select modules (of the drafter)
    assert any("'^(e_proj|h_proj)$' selects no module" in w for w in plan(V4, recipe).warnings)
    j = p.to_json()
    assert j["total_bytes_with_drafter"] == p.bytes_with_drafter and j["drafter"]["layout"] == "deepseek_v4_mtp"
    assert j["drafter"]["total_bytes"] == d.total_bytes and "drafter" not in plan(V4, "q4q8").to_json()
    run = rel.run_cli("plan", V4, "--recipe", recipe, "--mtp")
    assert run.returncode == 0, run.stderr
    assert "drafter (--mtp)" in run.stdout and "decoder.ffn.switch_mlp.down_proj.weight" in run.stdout
    assert "total with the drafter" in run.stdout


def test_mtp_is_refused_before_anything_is_written(tmp_path):
    version = runtime_named("mlx-vlm").version()
    rel.cli_refuses(GLM, tmp_path / "glm", ["fp8-to-affine", GLM, tmp_path / "glm", "--mtp"],
                    f"mlx-vlm {version} has no glm4_moe_lite_mtp drafter model")
    assert not (tmp_path / "glm-mtp").exists()
    rel.api_refuses(FIXTURES / "gpt-oss-tiny", tmp_path / "oss", "the gpt_oss layout has no drafter",
                    "DeepSeek-V4-Flash (deepseek_v4)", "GLM-4.7-Flash (glm4_moe_lite)", recipe="q4q8", mtp=True)
    rel.api_refuses(V4, tmp_path / "v4", "must be a directory of its own", recipe="q4q8", mtp=True, mtp_out=tmp_path / "v4" / "d")
    no_mtp = tmp_path / "no-mtp"
    tensors, _ = fl.read_checkpoint(V4)
    fl.write_checkpoint(no_mtp, {k: v for k, v in tensors.items() if not k.startswith("mtp.")}, json.loads((V4 / "config.json").read_text()))
    err = rel.api_refuses(no_mtp, tmp_path / "out", "the source has no MTP layer", "mtp.0.e_proj.weight", "mtp.0.h_proj.weight",
                          recipe="q4q8", mtp=True)
    assert err.file == str(no_mtp)
    assert not (tmp_path / "out-mtp").exists()
    bad = rel.copy_fixture(V4.name, tmp_path / "bad")  # bad input in the main model, found after the drafter was written
    scale = "layers.2.attn.wq_b.scale"
    rel.poke(rel.shard_of(bad, scale), scale, 0, b"\xff")
    rel.api_refuses(bad, tmp_path / "bad-out", f"tensor '{scale}'", "E8M0 scale code 255", recipe="q4q8", mtp=True)
    assert not (tmp_path / "bad-out-mtp").exists() and not (tmp_path / "bad-out-mtp.partial").exists()


def test_glm_keeps_dropping_its_mtp_layer_and_its_drafter_names_are_mlx_vlms_splitter(tmp_path):
    """mlx-vlm 0.7.10 can split GLM-4.7-Flash's MTP layer but has no model class to load it: fmtconv's drafter layout
    is held to the runtime's own splitter, names, shapes and the modules it quantizes."""
    from mlx_vlm.split_mtp import split_mtp

    config = json.loads((GLM / "config.json").read_text())
    mtp = f"model.layers.{config['num_hidden_layers']}."
    main = plan(GLM, "q4q8")
    assert {n for n in main.dropped} == {n for n in fl.read_checkpoint(GLM)[0] if n.startswith(mtp) and not n.endswith("_scale_inv")}
    bf16 = tmp_path / "bf16"  # the splitter reads BF16 releases (it leaves FP8 scales unapplied)
    dense = {k: v if k.endswith("e_score_correction_bias") else v.astype(ml_dtypes.bfloat16)
             for k, v in fl.decode_fixture_dense(GLM).items()}
    fl.write_checkpoint(bf16, dense, {k: v for k, v in config.items() if k != "quantization_config"})
    split, _ = fl.read_safetensors_file(split_mtp(str(bf16), str(tmp_path / "split")) / "model.safetensors")
    quantized, _ = fl.read_safetensors_file(split_mtp(str(bf16), str(tmp_path / "q"), q_bits=4, q_group_size=32) / "model.safetensors")
    with Checkpoint(GLM) as ck:
        targets, dropped = Glm4MoeLiteMtpLayout().targets(find_groups(ck.tensors, config), config)
    assert {t.name: target_shape(t) for t in targets} == {k: tuple(v.shape) for k, v in split.items()} and not dropped
    assert {t.name.removesuffix(".weight") for t in targets if t.quantizable} == {k.removesuffix(".scales") for k in quantized if k.endswith(".scales")}


def test_full_size_deepseek_v4_flash_drafter_plan_passes_the_mlx_vlm_check(tmp_path):
    """The header-only DeepSeek-V4-Flash release (256 experts, wo_a of 8 groups): the drafter's plan against the
    drafter class, lazily, before anything is written."""
    src = rh.write_release(tmp_path / "release", rh.v4_flash_config(), rh.v4_flash_specs())
    d = plan(src, "q4q8", mtp=True).drafter
    report = check_plan(d)
    assert report.ok, report.problems[:5]
    quant = {t.target.module: (t.bits, t.shape) for t in d.tensors if t.quantized}
    assert quant["decoder.ffn.switch_mlp.up_proj"] == (4, (256, 2048, 4096)) and quant["decoder.attn.wo_a"] == (8, (8, 1024, 4096))
    assert quant["e_proj"] == (8, (4096, 4096)) and len(quant) == 13


def test_mtp_out_puts_the_drafter_where_asked_and_an_existing_one_needs_overwrite(tmp_path):
    out, draft = tmp_path / "v4", tmp_path / "elsewhere" / "drafter"
    convert(V4, out, recipe="q4q8", kernel_backend="cpu", mtp=True, mtp_out=draft, workers=1)
    assert (draft / "config.json").exists() and (out / "config.json").exists() and not (tmp_path / "v4-mtp").exists()
    shutil.rmtree(out)
    rel.api_refuses(V4, out, "output exists", recipe="q4q8", mtp=True, mtp_out=draft)
    convert(V4, out, recipe="q4q8", kernel_backend="cpu", mtp=True, mtp_out=draft, overwrite=True, workers=1)
    assert json.loads((draft / "config.json").read_text())["model_type"] == "deepseek_v4_mtp"


def test_a_pair_stopped_by_a_full_disk_resumes_into_the_bundles_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """ENOSPC in the main bundle, after the drafter was written: neither directory appears, both partials stay, and
    the same call finishes both, the main bundle's finished shards kept, every shard as an uninterrupted run's."""
    import errno

    from fmtconv.errors import FmtconvError
    from fmtconv.formats.safetensors_io import PreallocatedSafetensorsWriter

    kw = dict(recipe="q4q8", kernel_backend="cpu", mtp=True, max_shard_bytes=300_000, workers=1)
    convert(V4, tmp_path / "ref" / "v4", **kw)
    out = tmp_path / "run" / "v4"
    real = PreallocatedSafetensorsWriter.write_at

    def full_disk(self, name, offset, data):
        if self.path.parent.name == "v4.partial" and name.startswith("language_model.model.layers.2."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, offset, data)

    monkeypatch.setattr(PreallocatedSafetensorsWriter, "write_at", full_disk)
    with pytest.raises(FmtconvError, match="disk full while writing"):
        convert(V4, out, **kw)
    assert not out.exists() and not out.with_name("v4-mtp").exists()
    assert (out.parent / "v4-mtp.partial" / "config.json").exists()
    kept = {f.name: f.stat().st_ino for f in (out.parent / "v4.partial").glob("*.safetensors")}
    assert kept
    monkeypatch.setattr(PreallocatedSafetensorsWriter, "write_at", real)
    convert(V4, out, **kw)
    assert {n: (out / n).stat().st_ino for n in kept} == kept
    for name in ("v4", "v4-mtp"):
        shards = lambda d: {f.name: f.read_bytes() for f in d.glob("*.safetensors")}  # noqa: E731
        assert shards(out.parent / name) == shards(tmp_path / "ref" / name), name
    assert not list(out.parent.glob("*.partial"))
