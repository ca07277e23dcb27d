"""fmtconv's bundle equals mlx_lm.convert's byte for byte on a source mlx_lm reads itself (DeepSeek-V3 FP8).

mlx_lm's sanitize multiplies FP8 by weight_scale_inv in float32 and casts to bfloat16; fmtconv's
default `--rounding mlx-lm` follows the same rounding, and `--kernel-backend cpu` reproduces the
quantize arithmetic MLX runs on Linux.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmtconv.convert import convert
from fmtconv.formats.safetensors_io import Checkpoint

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "deepseek-v3-fp8-tiny"


def _q4q8(path: str, module) -> dict:
    return {"group_size": 64, "bits": 4 if "switch_mlp" in path else 8, "mode": "affine"}


@pytest.fixture(scope="module")
def both(tmp_path_factory) -> tuple[Path, Path]:
    from mlx_lm.convert import convert as mlx_lm_convert

    root = tmp_path_factory.mktemp("vs")
    theirs = root / "mlx_lm"
    mlx_lm_convert(str(FIXTURE), str(theirs), quantize=True, q_group_size=64, q_bits=4, quant_predicate=_q4q8)
    ours = root / "fmtconv"
    convert(FIXTURE, ours, recipe="q4q8", kernel_backend="cpu", rounding="mlx-lm")
    return theirs, ours


def test_every_tensor_is_byte_identical(both) -> None:
    theirs, ours = both
    with Checkpoint(theirs) as a, Checkpoint(ours) as b:
        assert set(a.tensors) == set(b.tensors)
        differ = [n for n in a.tensors if (a.tensors[n].dtype, a.tensors[n].shape) != (b.tensors[n].dtype, b.tensors[n].shape)
                  or a.raw(n).tobytes() != b.raw(n).tobytes()]
        assert not differ, f"{len(differ)} of {len(a.tensors)} tensors differ, e.g. {differ[:5]}"


def test_quantization_blocks_agree(both) -> None:
    theirs, ours = both
    qa = json.loads((theirs / "config.json").read_text())["quantization"]
    qb = json.loads((ours / "config.json").read_text())["quantization"]

    def per_module(q: dict) -> dict:
        default = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
        return default, {k: v for k, v in q.items() if isinstance(v, dict)}

    da, ma = per_module(qa)
    db, mb = per_module(qb)
    modules = set(ma) | set(mb)
    with Checkpoint(ours) as ck:
        modules |= {n[: -len(".scales")] for n in ck.tensors if n.endswith(".scales")}
    for m in modules:
        assert ma.get(m, da)["bits"] == mb.get(m, db)["bits"], m
        assert ma.get(m, da)["group_size"] == mb.get(m, db)["group_size"], m
