"""`fmtconv eval`: the streamed, layer-by-layer evaluation agrees with holding both whole models (every fixture, every
runtime that loads it), its teacher is the float32 reference forward the runtime tests use, and bad input is refused
with nothing written."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fmtconv.convert import convert
from fmtconv.convert.check.eval import EVAL_FILE, TokenBatch, evaluate, evaluate_direct
from fmtconv.convert.check.eval.tokens import chunk, random_ids
from runtime_helpers import CLIENTS, FIXTURES, logits, tokens_for

WRAPPED = ("deepseek-v3-fp8-tiny", "gpt-oss-tiny", "step3p5-mxfp4-tiny", "glm4-moe-lite-fp8-tiny", "qwen3-moe-fp8-tiny")
CASES = [pytest.param(name, None, id=f"{name}-{CLIENTS[name][0]}") for name in CLIENTS]
CASES += [pytest.param(name, "mlx-vlm", id=f"{name}-mlx-vlm-wrapped") for name in WRAPPED]


def _vocab(fixture: Path) -> int:
    config = json.loads((fixture / "config.json").read_text())
    return config.get("vocab_size") or config["text_config"]["vocab_size"]


def _tokens(fixture: Path) -> TokenBatch:
    """Two sequences of different lengths (the batch is right-padded), long enough for DeepSeek-V4's 128:1 compressor."""
    n = 160 if json.loads((fixture / "config.json").read_text())["model_type"] == "deepseek_v4" else 48
    ids = random_ids(2 * n, _vocab(fixture), seed=3)
    return TokenBatch([ids[:n], ids[n : 2 * n - 5]], "test ids")


@functools.cache
def _bundle(name: str, runtime: str | None, tmp: Path) -> Path:
    out = tmp / f"{name}-{runtime or 'own'}"
    convert(FIXTURES / name, out, recipe="q4q8", kernel_backend="cpu", runtime=runtime)
    return out


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-bundles")


@pytest.mark.parametrize("name,runtime", CASES)
def test_streamed_and_direct_agree(name, runtime, bundles):
    fixture = FIXTURES / name
    out = _bundle(name, runtime, bundles)
    tokens = _tokens(fixture)
    streamed = evaluate(out, fixture, tokens)
    direct = evaluate_direct(out, fixture, tokens)
    for key in ("kl_mean", "top1", "top5", "ppl_student"):
        assert streamed.metrics[key] == pytest.approx(direct.metrics[key], rel=1e-5, abs=1e-12), key
    np.testing.assert_allclose(streamed.teacher_logits, direct.teacher_logits, rtol=1e-5, atol=1e-6)
    n_layers = len(streamed.layers)
    assert n_layers >= 2 and all(0 < row["rel_error"] < 1 for row in streamed.layers)
    assert "routed experts" in streamed.worst_layers and 0 < streamed.embedding_rel_error < 0.1
    assert 0 < streamed.metrics["kl_mean"] < 1 and streamed.metrics["tokens"] == sum(len(s) for s in tokens.sequences)
    print(f"{name} ({streamed.runtime}): kl_mean {streamed.metrics['kl_mean']:.5f} top1 {streamed.metrics['top1']:.3f}, "
          f"direct {direct.metrics['kl_mean']:.5f} {direct.metrics['top1']:.3f}; peak RSS {streamed.peak_rss_mb} MB")


@pytest.mark.parametrize("name", list(CLIENTS))
def test_teacher_is_the_float32_reference_forward(name, bundles):
    """The teacher's logits equal the runtime tests' reference: the fixture decoded by its generator's own code, in
    the runtime's model, float32."""
    fixture = FIXTURES / name
    ids = tokens_for(fixture)
    report = evaluate(_bundle(name, None, bundles), fixture, TokenBatch([ids], "tokens_for"))
    want = logits(CLIENTS[name][1](fixture), ids)
    np.testing.assert_allclose(report.teacher_logits[0, : len(ids)], want, rtol=1e-5, atol=1e-5)


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fmtconv.convert.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_report_is_recorded_in_the_bundle_and_its_card(tmp_path):
    fixture = FIXTURES / "qwen3-moe-fp8-tiny"
    out = tmp_path / "out"
    run = _cli("convert", fixture, out, "--recipe", "mixed_3_6", "--kernel-backend", "cpu", "--eval", "--n-tokens", "64",
               "--seq-len", "32", "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)["eval"]
    for key in ("kl_mean", "kl_p50", "kl_p95", "kl_p99", "kl_max", "top1", "top5", "ppl_teacher", "ppl_student", "tokens",
                "layers", "peak_rss_mb"):
        assert key in report, key
    assert report["tokens"] == 64 and report["sequences"] == 2 and "seeded random ids" in report["tokens_source"]
    assert json.loads((out / EVAL_FILE).read_text())["kl_mean"] == report["kl_mean"]
    card = (out / "README.md").read_text()
    assert "## Quality against the source" in card and f"{report['kl_mean']:.5f}" in card

    text = _cli("eval", out, "--source", fixture, "--n-tokens", "64", "--seq-len", "32", "--no-record")
    assert text.returncode == 0, text.stderr
    assert "KL(teacher || student)" in text.stdout and "routed experts" in text.stdout


def test_text_tokenized_by_the_checkpoints_tokenizer(tmp_path):
    fixture = FIXTURES / "gpt-oss-tiny"
    out = _bundle("gpt-oss-tiny", None, tmp_path)
    text = tmp_path / "words.txt"
    text.write_text(" ".join(f"w{i}" for i in range(3, 83)))  # words of the fixture's word-level vocabulary
    run = _cli("eval", out, "--source", fixture, "--text", text, "--json", "--no-record")
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["tokens"] == 80 and "tokenized by the tokenizer in" in report["tokens_source"]


def _refused(run: subprocess.CompletedProcess, *needles: str) -> None:
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.startswith("fmtconv: error:") and "Traceback" not in run.stderr
    for n in needles:
        assert n in run.stderr, run.stderr


def test_a_bundle_of_another_source_is_refused(tmp_path):
    out = _bundle("gpt-oss-tiny", None, tmp_path)
    _refused(_cli("eval", out, "--source", FIXTURES / "qwen3-moe-fp8-tiny"), "does not match the source", "model_type")
    assert not (out / EVAL_FILE).exists()


def test_ids_outside_the_vocabulary_are_refused(tmp_path):
    out = _bundle("gpt-oss-tiny", None, tmp_path)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 6, 7], [8, 100000]]))
    _refused(_cli("eval", out, "--source", FIXTURES / "gpt-oss-tiny", "--tokens", ids), "sequence 1", "100000",
             f"vocabulary of {_vocab(FIXTURES / 'gpt-oss-tiny')}", str(ids))
    ids.write_text("[[1, 2], 3]")
    _refused(_cli("eval", out, "--source", FIXTURES / "gpt-oss-tiny", "--tokens", ids), "JSON list of non-empty lists")
    assert not (out / EVAL_FILE).exists()


def test_no_tokenizer_and_no_tokens_is_refused_before_converting(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "gpt-oss-tiny", src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    out = tmp_path / "out"
    _refused(_cli("convert", src, out, "--recipe", "q4q8", "--eval"), "no tokenizer", "--tokens")
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_chunking():
    assert chunk(list(range(10)), 9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a last piece of one id is dropped
    assert chunk(list(range(10)), 10, 4)[-1] == [8, 9]
