"""Model card: its module table is the written config + shards, read back; size and bits per weight add up."""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from fmtconv.convert.publish.model_card import files_info, render_model_card, write_model_card
from fmtconv.convert.check.verify import verify_bundle
from fmtconv.convert.naming import module_pattern
from fmtconv.formats.safetensors_io import INDEX_NAME, save_sharded

N_LAYERS = 6
DEFAULT = {"group_size": 64, "bits": 8, "mode": "affine"}


def _down_bits(i: int) -> dict:
    """A DQ4-style per-layer rule: 6-bit down_proj in the first two layers, 5-bit in the last, 4-bit between."""
    bits = 6 if i < 2 else 5 if i == N_LAYERS - 1 else 4
    return {"group_size": 64, "bits": bits, "mode": "affine"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card") / "tiny-dq4"
    rng = np.random.default_rng(3)
    tensors: dict[str, np.ndarray] = {}
    quant: dict = dict(DEFAULT)

    def put(p: str, shape: tuple[int, ...], q: dict) -> None:
        x = mx.array(rng.standard_normal(shape).astype(np.float32) * 0.02).astype(mx.bfloat16)
        for role, a in zip(("weight", "scales", "biases"), mx.quantize(x, q["group_size"], q["bits"], mode=q["mode"])):
            tensors[f"{p}.{role}"] = np.array(a.astype(mx.float32)).astype(ml_dtypes.bfloat16) if a.dtype == mx.bfloat16 else np.array(a)

    put("model.embed_tokens", (256, 64), DEFAULT)
    for i in range(N_LAYERS):
        put(f"model.layers.{i}.self_attn.q_proj", (64, 64), DEFAULT)
        q = _down_bits(i)
        put(f"model.layers.{i}.mlp.down_proj", (64, 128), q)
        quant[f"model.layers.{i}.mlp.down_proj"] = q
        e = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        put(f"model.layers.{i}.mlp.switch_mlp.up_proj", (4, 128, 64), e)
        quant[f"model.layers.{i}.mlp.switch_mlp.up_proj"] = e
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(64, dtype=ml_dtypes.bfloat16)
    tensors["model.norm.weight"] = np.ones(64, dtype=ml_dtypes.bfloat16)
    save_sharded(out, tensors, max_shard_bytes=60_000)
    config = {"model_type": "tiny", "torch_dtype": "bfloat16", "quantization": quant, "quantization_config": quant,
              "fmtconv": {"version": "0.1.0", "source": "some-org/Tiny-DQ", "recipe": "dq4"}}
    (out / "config.json").write_text(json.dumps(config))
    (out / "tokenizer.json").write_text("{}")
    return out


def _table(card: str) -> list[dict]:
    """The '## Modules' markdown table as dicts."""
    section = card.split("## Modules", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def _layers(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        a, _, b = part.partition("-")
        out.update(range(int(a), int(b or a) + 1))
    return out


def _card(bundle: Path) -> str:
    config = json.loads((bundle / "config.json").read_text())
    return render_model_card(config, "some-org/Tiny-DQ", "dq4", verify_bundle(bundle).summary_json(), files_info(bundle),
                             revision="abc123", repo_id="me/Tiny-DQ-mlx")


def test_table_matches_config(bundle):
    config = json.loads((bundle / "config.json").read_text())
    q = config["quantization"]
    rows = _table(_card(bundle))
    index = json.loads((bundle / INDEX_NAME).read_text())["weight_map"]
    modules = sorted({n.rsplit(".", 1)[0] for n in index if n.endswith(".scales")})
    for p in modules:
        want = q.get(p, DEFAULT)
        layer = re.search(r"\.(\d+)\.", p)
        hits = [r for r in rows if r["Module pattern"] == f"`{module_pattern(p)}`"
                and (layer is None or int(layer.group(1)) in _layers(r["Layers"]))]
        assert len(hits) == 1, (p, hits)
        r = hits[0]
        assert (r["Mode"], int(r["Bits"]), int(r["Group"])) == (want.get("mode", "affine"), want["bits"], want["group_size"]), p
    # every weight is counted once: quantized modules plus the dense tensors
    dense = [n for n in index if n.rsplit(".", 1)[0] not in modules]
    assert sum(int(r["Count"]) for r in rows) == len(modules) + len(dense)
    down = {int(r["Bits"]): r["Layers"] for r in rows if "down_proj" in r["Module pattern"]}
    assert down == {6: "0-1", 4: "2-4", 5: "5"}


def test_size_and_bits_per_weight(bundle):
    card = _card(bundle)
    index = json.loads((bundle / INDEX_NAME).read_text())
    config = json.loads((bundle / "config.json").read_text())
    from fmtconv.formats.safetensors_io import Checkpoint

    params = 0
    with Checkpoint(bundle) as ck:
        for n, info in ck.tensors.items():
            p = n.rsplit(".", 1)[0]
            if n.endswith(".weight") and info.dtype == "U32":  # mlx_lm get_total_parameters: weight.size * 32 // bits
                params += info.numel * 32 // config["quantization"].get(p, DEFAULT)["bits"]
            elif not n.endswith((".scales", ".biases")):
                params += info.numel
    bpw = index["metadata"]["total_size"] * 8 / params
    assert f"| Effective bits per weight | {bpw:.3f} |" in card
    assert f"({params})" in card
    n_shards = len(set(index["weight_map"].values()))
    assert n_shards > 1 and f"in {n_shards} shard(s)" in card


def test_card_header_verify_and_snippet(bundle):
    card = _card(bundle)
    assert card.startswith("---\nlibrary_name: mlx\n")
    assert "base_model: some-org/Tiny-DQ" in card
    assert "[some-org/Tiny-DQ](https://huggingface.co/some-org/Tiny-DQ) at revision `abc123`" in card
    assert "recipe `dq4`" in card
    assert "`fmtconv verify` passed" in card
    assert 'load("me/Tiny-DQ-mlx")' in card
    bits = card.split("## Bit distribution", 1)[1].split("\n## ", 1)[0]
    for label in ("8-bit affine", "4-bit mxfp4", "6-bit affine", "5-bit affine", "4-bit affine", "bfloat16"):
        assert f"| {label} |" in bits


def test_card_shows_sqnr_summary(bundle):
    summary = {"ok": True, "problems": 0, "modules": 3, "tensors": 5, "compared": 2,
               "patterns": [{"pattern": "model.layers.{i}.mlp.down_proj", "kind": "4-bit affine", "count": 2,
                             "min_sqnr_db": 19.5, "median_sqnr_db": 20.25, "max_abs_error": 0.01, "outliers": 0}],
               "outliers": ["model.layers.3.mlp.down_proj.weight"]}
    card = render_model_card(json.loads((bundle / "config.json").read_text()), "/local/src", None, summary, files_info(bundle))
    assert "| `model.layers.{i}.mlp.down_proj` | 4-bit affine | 2 | 19.50 | 20.25 | 0.01 |" in card
    assert "`model.layers.3.mlp.down_proj.weight`" in card
    assert "base_model" not in card and "`/local/src`" in card


def test_write_model_card_uses_provenance(bundle):
    path = write_model_card(bundle)
    text = path.read_text()
    assert path.name == "README.md"
    assert "some-org/Tiny-DQ" in text and "recipe `dq4`" in text and "passed" in text
    assert verify_bundle(bundle).ok  # the card does not disturb the bundle
