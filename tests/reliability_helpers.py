"""Shared helpers of the reliability tests (tests/test_reliability_*.py).

Corrupted copies of the tiny fixtures in tmp_path, the CLI run as a subprocess, and the four
checks every reliability test makes: non-zero exit (or FmtconvError), a message naming the
file/tensor and what was wrong, no complete-looking OUT, and the source byte-for-byte untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from fmtconv.convert import convert
from fmtconv.errors import FmtconvError
from fmtconv.formats.safetensors_io import INDEX_NAME, save_sharded

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
V4 = "deepseek-v4-tiny"  # MXFP4 experts (I8 + F8_E8M0 scale), FP8 with E8M0 block scales
V3 = "deepseek-v3-fp8-tiny"  # FP8 with float32 weight_scale_inv
CLI = [sys.executable, "-m", "fmtconv.convert.cli"]


# ---- sources ------------------------------------------------------------------------------------
def copy_fixture(name: str, dest: Path) -> Path:
    """A private copy of fixtures/<name> (the fixtures themselves are never modified)."""
    shutil.copytree(FIXTURES / name, dest)
    return dest


def dense_source(dest: Path, *, hidden: int = 128, inter: int = 256, layers: int = 2, vocab: int = 96,
                 shard_bytes: int = 60_000, seed: int = 0) -> Path:
    """A small dense bf16 llama checkpoint (generic layout), several shards, written with numpy only."""
    rng = np.random.default_rng(seed)
    config = {"model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": inter,
              "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    kv = hidden // 2
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    weights = {n: (rng.standard_normal(s) * 0.05).astype(ml_dtypes.bfloat16) for n, s in shapes.items()}
    save_sharded(dest, weights, max_shard_bytes=shard_bytes, metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "tokenizer_config.json").write_text("{}")
    return dest


def shard_of(src: Path, tensor: str) -> Path:
    """The shard file that holds `tensor`, by the index."""
    return src / json.loads((src / INDEX_NAME).read_text())["weight_map"][tensor]


# ---- raw safetensors surgery --------------------------------------------------------------------
def read_raw(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header dict, data area bytes) of a safetensors file, without any validation."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_raw(path: Path, header: dict[str, Any] | bytes, data: bytes, *, header_len: int | None = None) -> None:
    """Write a file from a header (dict or raw bytes) and a data area; `header_len` overrides the length field."""
    body = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    if not isinstance(header, bytes):
        body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body) if header_len is None else header_len) + body + data)


def edit_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply `edit` to the header dict of `path` in place, keeping the data area as it is."""
    header, data = read_raw(path)
    edit(header)
    write_raw(path, header, data)


def tensor_bytes(path: Path, tensor: str) -> tuple[int, int]:
    """Absolute [start, end) of a tensor's bytes in its file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[tensor]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def poke(path: Path, tensor: str, index: int, value: bytes) -> None:
    """Overwrite bytes of one tensor at byte `index` (within the tensor) with `value`."""
    start, end = tensor_bytes(path, tensor)
    assert start + index + len(value) <= end
    with open(path, "r+b") as f:
        f.seek(start + index)
        f.write(value)


# ---- the checks ---------------------------------------------------------------------------------
def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root (relative path -> digest), plus directories as 'dir'."""
    out: dict[str, str] = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def run_cli(*args: Any, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
    """`python -m fmtconv.convert.cli ARGS` in a child process, output captured as text."""
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=REPO, **kw)


def partial_of(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def assert_no_bundle(out: Path, *, partial_ok: bool = False) -> None:
    """OUT is absent; OUT.partial is absent too unless the work is meant to be resumable, and never looks complete."""
    assert not out.exists(), f"{out} exists after a failed conversion"
    partial = partial_of(out)
    if not partial_ok:
        assert not partial.exists(), f"{partial} left behind after a refused conversion"
    elif partial.exists():
        assert not (partial / "config.json").exists() and not (partial / INDEX_NAME).exists()


def assert_cli_refuses(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, one 'fmtconv: error:' line naming every needle, no traceback."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {err}"
    assert "fmtconv: error:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    return err


def cli_refuses(src: Path, out: Path, cmd: list[Any], *needles: str, partial_ok: bool = False) -> str:
    """Run the CLI on src -> out; assert the refusal, no bundle, and the source untouched. Returns stderr."""
    before = tree_hashes(src)
    err = assert_cli_refuses(run_cli(*cmd), *needles)
    assert_no_bundle(out, partial_ok=partial_ok)
    assert tree_hashes(src) == before, "the source changed"
    return err


def api_refuses(src: Path, out: Path, *needles: str, partial_ok: bool = False, **kw: Any) -> FmtconvError:
    """convert(src, out, **kw) raises FmtconvError naming every needle; no bundle; the source untouched."""
    before = tree_hashes(src)
    kw.setdefault("kernel_backend", "cpu")
    kw.setdefault("workers", 1)
    with pytest.raises(FmtconvError) as ei:
        convert(src, out, **kw)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg}"
    assert_no_bundle(out, partial_ok=partial_ok)
    assert tree_hashes(src) == before, "the source changed"
    return ei.value




def mxfp4_recipe():
    """The recipe `fmtconv mxfp4-to-affine` uses by default (4-bit, group 64), for API runs that must match CLI runs."""
    from fmtconv.convert.recipes import source_recipe

    return source_recipe(4, 64, ("mxfp4",), "mxfp4-to-affine-4bit-g64")
