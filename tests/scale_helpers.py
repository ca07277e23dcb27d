"""Shared helpers of tests/test_scale_*.py: dense bf16 sources (generic layout), child-process runs with RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_dtypes
import numpy as np

from fmtconv.formats.safetensors_io import Checkpoint, save_sharded

# A config no family layout and no runtime claims (generic names, and the runtime check is skipped with a
# warning): these tests are about the pipeline's memory and resume, on weights that form no real model.
CONFIG = {"model_type": "synthetic_dense", "hidden_size": 256, "num_hidden_layers": 1, "torch_dtype": "bfloat16", "vocab_size": 64}


def random_bf16(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """bfloat16 values of magnitude 2^-8..2^-4 built from random bits (fast for tens of millions)."""
    rng = np.random.default_rng(seed)
    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    exp = (np.uint16(119) + ((r >> np.uint16(7)) & np.uint16(3))) << np.uint16(7)
    return ((r & np.uint16(0x807F)) | exp).view(ml_dtypes.bfloat16)


def dense_checkpoint(path: Path, tensors: dict[str, tuple[int, ...]], *, shard_bytes: int = 1 << 30) -> Path:
    """A bf16 checkpoint (generic layout) with the given 2-D linear weights plus a norm."""
    weights = {name: random_bf16(shape, i) for i, (name, shape) in enumerate(tensors.items())}
    weights["model.norm.weight"] = np.ones(256, dtype=ml_dtypes.bfloat16)
    save_sharded(path, weights, max_shard_bytes=shard_bytes, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(CONFIG))
    return path


def tensor_bytes(out: Path) -> dict[str, bytes]:
    with Checkpoint(out) as ck:
        return {n: ck.raw(n).tobytes() for n in ck.tensors}


def child_script(src: Path, out: Path, *, block_elements: int | None = None, workers: int = 2,
                 max_shard_bytes: int | None = None, pause_after_shard: float = 0.0, recipe: str = "q4q8") -> str:
    """Python source that converts src -> out in a fresh interpreter (optionally with a smaller row block,
    or a pause after each recorded shard so a test can kill it mid-way)."""
    return textwrap.dedent(f"""
        import time
        from fmtconv.convert import encode, pipeline
        from fmtconv.convert import convert
        if {block_elements!r} is not None:
            encode.BLOCK_ELEMENTS = {block_elements!r}
        if {pause_after_shard!r}:
            _save = pipeline.Converter._save_manifest
            def _slow(self, m):
                _save(self, m)
                time.sleep({pause_after_shard!r})
            pipeline.Converter._save_manifest = _slow
        kw = {{}} if {max_shard_bytes!r} is None else {{"max_shard_bytes": {max_shard_bytes!r}}}
        convert({str(src)!r}, {str(out)!r}, recipe={recipe!r}, kernel_backend="cpu", workers={workers}, **kw)
        from fmtconv.convert.bench.phases import peak_rss_self
        print("VMHWM", peak_rss_self())
    """)


def run_child(script: str) -> tuple[int, int]:
    """Run a script in a child interpreter; (exit status, that child's peak RSS in bytes).

    The peak is the child's own VmHWM (printed by the script): Linux starts a child's ru_maxrss
    (getrusage RUSAGE_CHILDREN / wait4) at the RSS its parent had when it forked, so under a large
    pytest process it would hide the conversion's own peak.
    """
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    hwm = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("VMHWM ")]
    assert hwm, proc.stdout
    return proc.returncode, hwm[-1]
