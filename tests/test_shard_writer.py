"""ShardWriter (as PreallocatedSafetensorsWriter writes a safetensors shard with it): pieces in any order, from several threads, give the bytes write_safetensors gives and the digest
shard_digest reads back, whether chunks go direct, through the page cache, or past the staging cap; failures leave no file."""

from __future__ import annotations

import concurrent.futures as cf
import errno
import os
from pathlib import Path

import numpy as np
import pytest

from fmtconv.errors import FmtconvError
from fmtconv.formats import shard_writer
from fmtconv.formats.safetensors_io import PreallocatedSafetensorsWriter as ShardWriter
from fmtconv.formats.safetensors_io import TensorSpec, write_safetensors
from fmtconv.formats.shard_writer import CHUNK_BYTES, ChunkPool, shard_digest

RNG = np.random.default_rng(0)
# ~2.6 chunks: two staged chunks and the file's last one, with tensors straddling chunk boundaries
TENSORS = {"a.weight": RNG.integers(0, 2**32, (1536, 2000), dtype=np.uint32),
           "a.scales": RNG.integers(0, 2**16, (1536, 250), dtype=np.uint16),
           "b.weight": RNG.integers(0, 256, (777, 9000), dtype=np.uint8)}


def _pieces(rows: int = 97) -> list[tuple[str, int, np.ndarray]]:
    out = []
    for name, a in TENSORS.items():
        row_bytes = a.nbytes // a.shape[0]
        out += [(name, r * row_bytes, a[r : r + rows]) for r in range(0, a.shape[0], rows)]
    RNG.shuffle(out)  # any order
    return out


def _write(path: Path, **kw) -> ShardWriter:
    w = ShardWriter(path, [TensorSpec.of(n, a) for n, a in TENSORS.items()], {"format": "mlx"}, **kw)
    with cf.ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda p: w.write_at(*p), _pieces()))
    w.close()
    return w


@pytest.fixture(scope="module")
def expected(tmp_path_factory) -> bytes:
    path = write_safetensors(tmp_path_factory.mktemp("ref") / "ref.safetensors", TENSORS, {"format": "mlx"})
    assert path.stat().st_size > 2 * CHUNK_BYTES
    return path.read_bytes()


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "page-cache"])
def test_any_order_same_bytes_and_digest(tmp_path: Path, expected: bytes, direct: bool) -> None:
    pool = ChunkPool()
    for k in range(2):  # a second shard reuses the pool's buffers
        w = _write(tmp_path / f"s{k}.safetensors", pool=pool, direct=direct)
        assert w.path.read_bytes() == expected
        assert w.digest == shard_digest(w.path) and w.digest.startswith(shard_writer.DIGEST_PREFIX)
        assert not w.tmp.exists()


def test_past_the_staging_cap_same_bytes_and_digest(tmp_path: Path, expected: bytes, monkeypatch) -> None:
    monkeypatch.setattr(shard_writer, "STAGED_CHUNKS", 1)  # every chunk opened while one is staged goes through
    w = _write(tmp_path / "s.safetensors")
    assert w.path.read_bytes() == expected
    assert w.digest == shard_digest(w.path) == _write(tmp_path / "t.safetensors", direct=False).digest


def test_a_missing_piece_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "s.safetensors", [TensorSpec.of(n, a) for n, a in TENSORS.items()])
    for p in _pieces()[1:]:
        w.write_at(*p)
    with pytest.raises(FmtconvError, match="closed before every tensor was written"):
        w.close()
    assert not list(tmp_path.iterdir())


def test_a_failed_write_behind_reaches_close_and_nothing_is_left(tmp_path: Path, monkeypatch) -> None:
    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwritev", full)
    w = ShardWriter(tmp_path / "s.safetensors", [TensorSpec.of(n, a) for n, a in TENSORS.items()])
    with pytest.raises(OSError) as ei:
        for p in _pieces():
            w.write_at(*p)  # a later piece may already see the writer thread's error
        w.close()
    assert ei.value.errno == errno.ENOSPC
    w.abort()
    assert not list(tmp_path.iterdir())
