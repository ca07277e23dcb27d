"""Bounded memory: a tensor that decodes to more than the bound converts within it, measured in a child.

At full scale (last test) a DeepSeek-V4-sized stacked expert tensor that decodes to 1.6 GB converts
with about 0.22 GB peak RSS. The scaled test below also proves the check has teeth and that the
streamed bytes equal the one-block (in-memory) path.

The issue's bound is 1.5 GB for the default row block (BLOCK_ELEMENTS = 4M elements). Scaled for CI:
row blocks of 64K elements (1/64) and a bound of 24 MB (1.5 GB / 64) over the RSS of the same child
converting a tiny checkpoint; the largest tensor (16M bf16 elements, 32 MB on disk) decodes to 64 MB of
float32. The same conversion as one block (the in-memory path) exceeds the bound and writes the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import scale_helpers as sh

SCALED_BLOCK = 1 << 16
BOUND = 24 * 10**6
BIG = (16384, 1024)  # 16M elements: 64 MB as float32


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mem")
    tiny = sh.dense_checkpoint(root / "tiny", {"model.layers.0.mlp.up_proj.weight": (256, 256)})
    big = sh.dense_checkpoint(root / "big", {"model.layers.0.mlp.up_proj.weight": (256, 256),
                                             "model.layers.0.mlp.down_proj.weight": BIG})
    return tiny, big


def test_peak_rss_stays_under_the_scaled_bound(sources: tuple[Path, Path], tmp_path: Path) -> None:
    tiny, big = sources
    _, base = sh.run_child(sh.child_script(tiny, tmp_path / "tiny-out", block_elements=SCALED_BLOCK))
    _, streamed = sh.run_child(sh.child_script(big, tmp_path / "streamed", block_elements=SCALED_BLOCK))
    _, in_memory = sh.run_child(sh.child_script(big, tmp_path / "one-block", block_elements=1 << 40))
    decoded = BIG[0] * BIG[1] * 4
    assert decoded > BOUND
    assert streamed - base < BOUND, f"streamed run used {(streamed - base) / 1e6:.1f} MB over the baseline"
    # The check has teeth: holding the whole tensor at once goes over the bound.
    assert in_memory - base > BOUND, f"one-block run used only {(in_memory - base) / 1e6:.1f} MB"
    assert sh.tensor_bytes(tmp_path / "streamed") == sh.tensor_bytes(tmp_path / "one-block")


def test_full_scale_bound_on_a_deepseek_v4_expert_tensor(tmp_path: Path) -> None:
    """The issue's own numbers: one stacked MXFP4 expert projection (48 x 2048 x 4096) decodes to 1.6 GB of
    float32, more than the 1.5 GB bound; the whole conversion's peak RSS (a child's VmHWM) stays under it."""
    from fmtconv.convert.bench.data import generate_checkpoint
    from fmtconv.formats.safetensors_io import Checkpoint

    src = generate_checkpoint(tmp_path / "synth", 0, quiet=True, hidden=4096, moe_inter=2048, experts=48, vocab=1024, layers=1)
    with Checkpoint(src) as ck:
        expert_params = sum(i.numel for n, i in ck.tensors.items() if ".ffn.experts." in n and n.endswith("w1.weight")) * 2
    assert expert_params * 4 > 1.5e9  # I8 holds two FP4 per byte; decoded as float32
    _, peak = sh.run_child(sh.child_script(src, tmp_path / "out", workers=2))
    assert peak < 1.5e9, f"peak RSS {peak / 1e9:.2f} GB"
