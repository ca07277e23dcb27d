"""verify: a good tiny MLX bundle (built with real mx.quantize) passes; each structural fault is caught."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from fmtconv.convert.check.verify import (
    ErrorStats,
    compare_with_source,
    max_abs_error,
    rows_of,
    sqnr_db,
    verify_bundle,
)
from fmtconv.convert.naming import module_pattern
from fmtconv.formats.safetensors_io import INDEX_NAME, Checkpoint, save_sharded

BF16 = ml_dtypes.bfloat16
SHARD_BYTES = 12_000  # small enough for two shards
Q = "model.layers.{}.self_attn.q_proj"
EXPERTS = "model.layers.0.mlp.switch_mlp.down_proj"
GATE = "model.layers.1.mlp.gate_proj"
NV = "model.layers.1.mlp.up_proj"


def _np(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.astype(mx.float32)).astype(BF16)  # exact: the values are bfloat16
    return np.array(a)


def _source_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    w = lambda *s: (rng.standard_normal(s) * 0.05).astype(BF16)  # noqa: E731
    return {
        Q.format(0) + ".weight": w(64, 128),
        Q.format(1) + ".weight": w(64, 128),
        EXPERTS + ".weight": w(4, 32, 64),
        GATE + ".weight": w(32, 128),
        NV + ".weight": w(32, 64),
        "model.layers.0.input_layernorm.weight": (1 + w(128)).astype(BF16),
        "model.layers.1.input_layernorm.weight": (1 + w(128)).astype(BF16),
    }


def _quantize(src: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    """MLX layout: default affine 4-bit g64; overrides for the mxfp4 experts, an 8-bit g32 and an nvfp4 module."""
    out: dict[str, np.ndarray] = {}
    overrides = {EXPERTS: {"group_size": 32, "bits": 4, "mode": "mxfp4"},
                 GATE: {"group_size": 32, "bits": 8, "mode": "affine"},
                 NV: {"group_size": 16, "bits": 4, "mode": "nvfp4"}}
    for name, arr in src.items():
        p = name[: -len(".weight")]
        if "layernorm" in name:
            out[name] = arr
            continue
        q = overrides.get(p, {"group_size": 64, "bits": 4, "mode": "affine"})
        x = mx.array(arr.astype(np.float32)).astype(mx.bfloat16)
        parts = mx.quantize(x, q["group_size"], q["bits"], mode=q["mode"])
        for role, a in zip(("weight", "scales", "biases"), parts):
            out[f"{p}.{role}"] = _np(a)
    quant = {"group_size": 64, "bits": 4, "mode": "affine", **overrides}
    config = {"model_type": "tiny", "quantization": quant, "quantization_config": quant,
              "fmtconv": {"version": "0", "source": "src", "recipe": "test"}}
    return out, config


def _write(out: Path, tensors: dict[str, np.ndarray], config: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("model*.safetensors"):
        f.unlink()
    save_sharded(out, tensors, max_shard_bytes=SHARD_BYTES)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    src = _source_tensors()
    save_sharded(root / "src", src)
    (root / "src" / "config.json").write_text("{}")
    tensors, config = _quantize(src)
    _write(root / "good", tensors, config)
    return root / "good", root / "src"


@pytest.fixture
def bad(good, tmp_path) -> Path:
    """A fresh copy of the good bundle to corrupt."""
    return Path(shutil.copytree(good[0], tmp_path / "bad"))


def _load(bundle: Path) -> tuple[dict[str, np.ndarray], dict]:
    with Checkpoint(bundle) as ck:
        tensors = {n: np.array(ck.array(n)) for n in ck.tensors}
    return tensors, json.loads((bundle / "config.json").read_text())


def _problems(bundle: Path, *needles: str) -> list[str]:
    r = verify_bundle(bundle)
    assert not r.ok
    hits = [p for p in r.problems if all(n in p for n in needles)]
    assert hits, f"no problem mentions {needles}: {r.problems}"
    return r.problems


def test_good_bundle_is_ok(good):
    r = verify_bundle(good[0])
    assert r.ok, r.problems
    assert len(list(good[0].glob("model-*-of-00002.safetensors"))) == 2
    kinds = {m.name: (m.mode, m.bits, m.group_size) for m in r.modules}
    assert kinds[EXPERTS] == ("mxfp4", 4, 32) and kinds[GATE] == ("affine", 8, 32) and kinds[NV] == ("nvfp4", 4, 16)
    assert kinds[Q.format(0)] == ("affine", 4, 64)
    assert kinds["model.layers.0.input_layernorm.weight"] == ("dense", 16, None)
    assert r.provenance["recipe"] == "test"
    json.dumps(r.to_json())


def test_missing_shard(bad):
    (bad / "model-00002-of-00002.safetensors").unlink()
    _problems(bad, "model-00002-of-00002.safetensors", "missing")


def test_tensor_not_in_index(bad):
    index = json.loads((bad / INDEX_NAME).read_text())
    name = Q.format(0) + ".scales"
    shard = index["weight_map"].pop(name)
    (bad / INDEX_NAME).write_text(json.dumps(index))
    _problems(bad, shard, repr(name), "not in " + INDEX_NAME)


def test_index_names_tensor_the_shard_lacks(bad):
    index = json.loads((bad / INDEX_NAME).read_text())
    index["weight_map"]["model.layers.0.ghost.weight"] = "model-00001-of-00002.safetensors"
    (bad / INDEX_NAME).write_text(json.dumps(index))
    _problems(bad, "model-00001-of-00002.safetensors", "does not hold", "'model.layers.0.ghost.weight'")


def test_unlisted_shard_on_disk(bad):
    shutil.copyfile(bad / "model-00001-of-00002.safetensors", bad / "model-extra.safetensors")
    _problems(bad, "model-extra.safetensors", "does not list")


def test_wrong_total_size(bad):
    index = json.loads((bad / INDEX_NAME).read_text())
    real = index["metadata"]["total_size"]
    index["metadata"]["total_size"] = real + 4
    (bad / INDEX_NAME).write_text(json.dumps(index))
    _problems(bad, "total_size", str(real + 4), str(real))


def test_missing_scales(bad):
    tensors, config = _load(bad)
    del tensors[Q.format(1) + ".scales"]
    _write(bad, tensors, config)
    _problems(bad, Q.format(1), "missing tensor", repr(Q.format(1) + ".scales"))


def test_missing_biases(bad):
    tensors, config = _load(bad)
    del tensors[GATE + ".biases"]
    _write(bad, tensors, config)
    _problems(bad, GATE, "missing tensor", repr(GATE + ".biases"))


def test_shape_inconsistent_with_bits_and_group(bad):
    tensors, config = _load(bad)
    for block in ("quantization", "quantization_config"):
        config[block][Q.format(0)] = {"group_size": 64, "bits": 8, "mode": "affine"}
    _write(bad, tensors, config)
    _problems(bad, repr(Q.format(0) + ".weight"), "bits=8 group_size=64", "expected last dim")


def test_override_names_missing_module(bad):
    tensors, config = _load(bad)
    ghost = "model.layers.7.self_attn.q_proj"
    for block in ("quantization", "quantization_config"):
        config[block][ghost] = {"group_size": 64, "bits": 8, "mode": "affine"}
    _write(bad, tensors, config)
    _problems(bad, repr(ghost), "names no module")


@pytest.mark.parametrize("what", ["scales-nan", "biases-inf", "mxfp4-scale-code-255"])
def test_nonfinite_scales_or_biases(bad, what):
    tensors, config = _load(bad)
    if what == "scales-nan":
        name = Q.format(0) + ".scales"
        a = tensors[name].copy()
        a[3, 1] = np.nan
    elif what == "biases-inf":
        name = GATE + ".biases"
        a = tensors[name].copy()
        a[0, 0] = np.inf
    else:
        name = EXPERTS + ".scales"  # E8M0 code 255 is NaN
        a = tensors[name].copy()
        a[1, 2, 0] = 255
    tensors[name] = a
    _write(bad, tensors, config)
    _problems(bad, repr(name), "1 NaN/Inf")


def test_leftover_source_quantization_block(bad):
    tensors, config = _load(bad)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    _write(bad, tensors, config)
    _problems(bad, "config.json", "leftover source quantization block", "quant_method='fp8'", "weight_block_size")


def test_modelopt_side_file_is_leftover(bad):
    (bad / "hf_quant_config.json").write_text(json.dumps({"quantization": {"quant_algo": "NVFP4"}}))
    _problems(bad, "hf_quant_config.json", "leftover")


def test_sqnr_against_source_matches_mlx(good):
    bundle, src = good
    r = verify_bundle(bundle, src)
    assert r.ok, r.problems
    by_name = {q.name: q for q in r.quality}
    assert set(by_name) == set(_source_tensors())  # every output has a same-name dense source here
    # The reference number, computed with MLX itself.
    tensors, _ = _load(bundle)
    ref = _source_tensors()[GATE + ".weight"].astype(np.float32)
    deq = mx.dequantize(*(mx.array(tensors[GATE + "." + k].astype(np.float32)).astype(mx.bfloat16) if k != "weight"
                          else mx.array(tensors[GATE + ".weight"]) for k in ("weight", "scales", "biases")), 32, 8)
    want = sqnr_db(ref, np.array(deq.astype(mx.float32)))
    assert by_name[GATE + ".weight"].sqnr_db == pytest.approx(want, abs=1e-9)
    e = _source_tensors()[EXPERTS + ".weight"]
    w, s = tensors[EXPERTS + ".weight"], tensors[EXPERTS + ".scales"]
    deq = np.array(mx.dequantize(mx.array(w), mx.array(s), mode="mxfp4", dtype=mx.float32))
    assert by_name[EXPERTS + ".weight"].sqnr_db == pytest.approx(sqnr_db(e.astype(np.float32), deq), abs=1e-9)
    assert 15 < by_name[Q.format(0) + ".weight"].sqnr_db < 25  # 4-bit affine on Gaussian weights
    assert math.isinf(by_name["model.layers.0.input_layernorm.weight"].sqnr_db)  # kept bfloat16: exact
    summary = {(s["pattern"], s["kind"]): s for s in r.summary()}
    row = summary[("model.layers.{i}.self_attn.q_proj", "4-bit affine")]
    assert row["count"] == 2 and row["min_sqnr_db"] <= row["median_sqnr_db"]
    assert not r.outliers
    assert json.loads(json.dumps(r.to_json()))["summary"]["compared"] == len(by_name)
    assert "q_proj" in r.to_text()


def test_compare_with_explicit_pairs_and_threshold(good):
    bundle, src = good
    arrays = _source_tensors()
    pairs = [(n, rows_of(arrays[n].astype(np.float32))) for n in (Q.format(0) + ".weight", EXPERTS + ".weight")]
    rows, problems = compare_with_source(bundle, src, pairs, threshold_db=30.0)
    assert not problems
    assert {r.name for r in rows} == {p[0] for p in pairs}
    assert all(r.outlier for r in rows)  # 4-bit and mxfp4 are both below 30 dB
    rows, problems = compare_with_source(bundle, src, [(GATE + ".weight", rows_of(np.zeros((3, 3), np.float32)))])
    assert not rows and "expected [32, 128]" in problems[0]


def test_error_stats_streaming_equals_whole():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((10, 8)).astype(np.float32)
    b = a + rng.standard_normal((10, 8)).astype(np.float32) * 1e-2
    s = ErrorStats()
    for i in range(0, 10, 3):
        s.update(a[i : i + 3], b[i : i + 3])
    assert s.sqnr_db == pytest.approx(sqnr_db(a, b))
    assert s.max_abs == max_abs_error(a, b)
    assert math.isinf(sqnr_db(a, a))
    assert math.isnan(sqnr_db(a, np.full_like(a, np.nan)))


def test_module_pattern():
    assert module_pattern("model.layers.12.mlp.experts.3.w1") == "model.layers.{i}.mlp.experts.{i}.w1"
    assert module_pattern("lm_head") == "lm_head"


def test_config_values_of_the_wrong_type_are_problems_not_tracebacks(bad):
    config_path = bad / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"], config["fmtconv"] = ["glm4_moe_lite"], {"layout": [1], "runtime": {"x": 1}}
    config_path.write_text(json.dumps(config))
    r = verify_bundle(bad)
    json.dumps(r.to_json())
