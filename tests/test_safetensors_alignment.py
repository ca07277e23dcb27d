"""Every tensor of every shard fmtconv writes starts at a data offset that is a multiple of its dtype's size, as
safetensors' own writer lays files out (vMLX checks it before loading, and rewrites a misaligned shard in place).
Offsets are read from the raw header here, not through fmtconv's reader."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from fmtconv.convert import convert, plan
from fmtconv.convert.plan import CAST, DROP, EXACT_AFFINE, PASSTHROUGH, REPACK, REQUANT
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import (
    Checkpoint,
    PreallocatedSafetensorsWriter,
    TensorSpec,
    encode_header,
    write_header_only,
    write_safetensors,
)
from runtime_helpers import CLIENTS, FIXTURES

pytestmark = pytest.mark.vmlx  # part of the core the vMLX environment runs too

# Element sizes in bytes (safetensors/src/tensor.rs Dtype::size); the packed sub-byte floats need none.
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1, "F6_E2M3": 1, "F6_E3M2": 1,
            "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
RECIPES = ("q4q8", "mixed_3_6", "lossless-affine", "mxfp4-experts", recipe_from_dict({"name": "fp-modes", "rules": [
    {"match": r"switch_mlp|\.mlp\.experts\.", "mode": "mxfp8", "on_indivisible": "keep"},
    {"match": r"norm", "mode": "dense", "dtype": "float32"},
    {"match": r"hc_head", "mode": "drop"},
    {"mode": "nvfp4", "on_indivisible": "keep"}]}))


def misaligned(header: bytes) -> list[str]:
    """Tensors of a safetensors file (its first bytes, header included) whose data does not start at a multiple of
    their element size, counted from the start of the file as a memory map sees them."""
    (n,) = struct.unpack("<Q", header[:8])
    entries = json.loads(header[8 : 8 + n])
    return [k for k, e in entries.items() if k != "__metadata__" and (8 + n + e["data_offsets"][0]) % ITEMSIZE[e["dtype"]]]


def file_misaligned(path: Path) -> list[str]:
    return misaligned(path.read_bytes())


def naive_offsets_misaligned(specs: list[TensorSpec]) -> bool:
    offset = 0
    for s in specs:
        if offset % ITEMSIZE[s.dtype]:
            return True
        offset += s.nbytes
    return False


ADVERSARIAL = {"a16": np.arange(3, dtype=np.float16), "b32": np.arange(3, dtype=np.float32), "c8": np.arange(5, dtype=np.uint8),
               "d64": np.arange(2, dtype=np.int64), "e16": np.arange(1, dtype=np.int16), "f32": np.arange(2, dtype=np.uint32)}


def test_the_writers_align_an_order_that_would_not_be(tmp_path):
    from safetensors.numpy import load_file

    specs = [TensorSpec.of(k, v) for k, v in ADVERSARIAL.items()]
    assert naive_offsets_misaligned(specs)
    streamed = write_safetensors(tmp_path / "streamed.safetensors", ADVERSARIAL)
    pre = PreallocatedSafetensorsWriter(tmp_path / "pre.safetensors", specs)
    for k in reversed(ADVERSARIAL):  # pieces in any order land at their tensor's offset
        pre.write_at(k, 0, ADVERSARIAL[k])
    pre.close()
    shadow = write_header_only(tmp_path / "shadow.safetensors", specs)
    for path in (streamed, tmp_path / "pre.safetensors", shadow):
        assert file_misaligned(path) == []
        assert path.read_bytes()[: len(encode_header(specs))] == encode_header(specs)
    for path in (streamed, tmp_path / "pre.safetensors"):
        back = load_file(str(path))  # safetensors' own reader
        assert back.keys() == ADVERSARIAL.keys() and all(np.array_equal(back[k], v) for k, v in ADVERSARIAL.items())


def test_an_order_that_is_aligned_is_kept():
    specs = [TensorSpec("w", "U32", (4, 2)), TensorSpec("s", "BF16", (4, 1)), TensorSpec("b", "BF16", (4, 1)), TensorSpec("n", "F32", (3,))]
    (n,) = struct.unpack("<Q", encode_header(specs)[:8])
    entries = json.loads(encode_header(specs)[8 : 8 + n])
    assert [k for k in entries] == ["w", "s", "b", "n"] and entries["n"]["data_offsets"] == [48, 60]


def _plans():
    """Every fixture for every runtime fmtconv writes it for, under recipes that between them take every route."""
    for name in CLIENTS:
        for runtime in ("mlx-lm", "mlx-vlm", "vmlx"):
            for recipe in RECIPES:
                try:
                    yield name, runtime, plan(FIXTURES / name, recipe, runtime=runtime, max_shard_bytes=200_000)
                except FmtconvError as e:
                    assert "layout for model_type" in str(e) or "exact affine route" in str(e), e


def test_every_fixture_route_and_runtime_plans_aligned_shards():
    routes: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for name, runtime, p in _plans():
        seen.add((name, runtime))
        routes |= {t.route for t in p.tensors} | ({DROP} if p.dropped else set())
        for shard in p.shards:
            assert misaligned(encode_header(shard, {"format": "mlx"})) == [], (name, runtime, p.recipe.name)
    assert routes == {PASSTHROUGH, CAST, REPACK, EXACT_AFFINE, REQUANT, DROP}
    assert ("deepseek-v4-flash-tiny", "vmlx") in seen and ("qwen3-moe-fp8-tiny", "mlx-vlm") in seen and len(seen) >= 14


def test_a_plan_whose_order_would_misalign_is_written_aligned(tmp_path):
    """Hyper-connections in bfloat16: `attn_hc.scale` is 3 x 2 bytes, so in plan order the uint32 words after them would
    start misaligned; the shard's writer moves them, the pipeline writes every piece where the header says."""
    fixture = FIXTURES / "deepseek-v4-flash-tiny"
    odd = recipe_from_dict({"name": "odd", "rules": [{"match": r"_hc$|hc_head$", "mode": "dense", "dtype": "bfloat16"},
                                                    {"match": "switch_mlp", "mode": "affine", "bits": 4}, {"mode": "affine", "bits": 8}]})
    p = plan(fixture, odd)
    assert naive_offsets_misaligned([s for t in p.tensors for s in t.parts])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the runtime check runs (mlx-vlm is installed) and passes
        summary = convert(fixture, tmp_path / "odd", recipe=odd, kernel_backend="cpu")
        convert(fixture, tmp_path / "plain", recipe="q4q8", kernel_backend="cpu")
    assert all(c["ok"] for c in summary["conformance"])
    shards = sorted((tmp_path / "odd").glob("model-*.safetensors"))
    assert shards and all(file_misaligned(s) == [] for s in shards)
    import mlx.core as mx

    odd_t = {k: v for s in shards for k, v in mx.load(str(s)).items()}
    plain_t = {k: v for s in (tmp_path / "plain").glob("model-*.safetensors") for k, v in mx.load(str(s)).items()}
    same = [k for k in odd_t if "_hc." not in k and ".hc_head." not in k]
    assert len(same) > 70 and all(mx.array_equal(odd_t[k], plain_t[k]).item() for k in same)  # every byte where its header says
    with Checkpoint(fixture) as ck:
        src = np.asarray(ck.array("layers.1.hc_ffn_scale"), dtype=np.float32)
    got = np.array(odd_t["language_model.model.layers.1.ffn_hc.scale"].astype(mx.float32))
    assert np.array_equal(got, np.array(mx.array(src).astype(mx.bfloat16).astype(mx.float32)))
