"""A file written from pieces that arrive in any order, from any thread: staged in aligned chunks, written behind.

The layout (a header, then named regions at fixed offsets) comes from the caller; safetensors_io's
PreallocatedSafetensorsWriter gives it a safetensors shard's.

The file is cut into CHUNK_BYTES chunks at aligned offsets.  A worker copies its piece into the buffer of the chunk
it falls in (one memcpy); a chunk whose every byte has arrived goes to a writer thread, which hashes it and writes
runs of consecutive chunks with one `pwritev`.  Where the filesystem takes direct I/O (Linux `O_DIRECT`), those
writes bypass the page cache: no page is allocated, copied into and written back per output byte, which is most of
a buffered write's cost (the README's profile).  Elsewhere (macOS, tmpfs) the same large writes go through the page
cache.  The chunk at the end of the file, and chunks opened past STAGED_CHUNKS (pieces far out of order), are written
through the page cache as they come and hashed when the shard is closed.

The digest (resume checks, `shard_digest`) is xxh3-128 over each chunk, then xxh3-128 over those digests in file
order: chunks can be hashed in any order, as they complete.  A resume needs to catch a shard that is not what was
written (torn, truncated, edited), not an adversary, who could rewrite the manifest as easily; xxh3 does that at
memory speed (26 GB/s here against 1.8 GB/s for SHA-256 with SHA-NI), 128 bits keep accidental collisions out of reach.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from fmtconv.errors import FmtconvError

CHUNK_BYTES = 8 << 20
# O_DIRECT wants file offsets, lengths and buffer addresses aligned to the device's logical block size
# (Linux open(2), "O_DIRECT"); 4096 covers 512-byte and 4Kn devices.  Chunk buffers are page-aligned mmaps.
ALIGN = 4096
QUEUE_CHUNKS = 8  # completed chunks waiting for the writer thread; a worker completing one more waits for the disk
# Chunks being filled at once; pieces of chunks opened past this go straight to the page cache.  With the queued and
# the one batch being written, a shard holds at most STAGED + QUEUE + BATCH + one per worker buffers (~370 MiB).
STAGED_CHUNKS = 32
BATCH_CHUNKS = 4  # consecutive chunks written by one pwritev (32 MiB)
DIGEST_PREFIX = "xxh3_128x8MiB:"
_DIRECT = getattr(os, "O_DIRECT", 0) if sys.platform.startswith("linux") else 0


class ChunkPool:
    """Page-aligned CHUNK_BYTES buffers, reused across a run's shards (a fresh page costs a fault and a zeroing)."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def get(self) -> np.ndarray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return np.frombuffer(mmap.mmap(-1, CHUNK_BYTES), dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)


@dataclass
class _Chunk:
    index: int
    length: int
    buf: np.ndarray | None  # None: written through the page cache as pieces come
    filled: int = 0


def _as_bytes(data: np.ndarray | bytes | memoryview) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)


def _pwrite_all(fd: int, buf: np.ndarray, offset: int) -> None:
    done = 0
    view = memoryview(buf)
    while done < buf.nbytes:
        done += os.pwrite(fd, view[done:], offset + done)


def _open_direct(path: Path) -> int:
    """A second descriptor on `path` with O_DIRECT, or -1 where the platform or filesystem refuses it (tmpfs: EINVAL)."""
    if not _DIRECT:
        return -1
    try:
        return os.open(path, os.O_WRONLY | _DIRECT)
    except OSError:
        return -1


def _combine(digests: list[bytes]) -> str:
    return DIGEST_PREFIX + xxhash.xxh3_128(b"".join(digests)).hexdigest()


class ShardWriter:
    """A file whose layout is known up front: `header` at offset 0, then regions name -> (offset, size) that together
    with the header cover the file; pieces of the regions land at their offsets.

    `write_at` may be called from several threads, for pieces of different regions in any order; `close()` checks
    every byte arrived, waits for the writer thread, fsyncs and renames `<name>.tmp` into place; `digest` is then the
    file's digest (as `shard_digest` computes it from the file).  `direct=False` keeps every write in the page cache.
    """

    def __init__(self, path: str | os.PathLike, header: bytes, regions: Mapping[str, tuple[int, int]], *,
                 pool: ChunkPool | None = None, direct: bool = True):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self._offsets = dict(regions)
        self.size = len(header) + sum(n for _, n in self._offsets.values())
        self.digest: str | None = None
        self._written = dict.fromkeys(self._offsets, 0)
        self._pool = pool or ChunkPool()
        self._chunks: dict[int, _Chunk] = {}
        self._staged = 0
        self._through: list[int] = []  # chunks written through the page cache, hashed at close
        self._digests: list[bytes | None] = [None] * -(-self.size // CHUNK_BYTES)
        self._lock = threading.Lock()
        self._queue: queue.Queue[_Chunk | None] = queue.Queue(QUEUE_CHUNKS)
        self._error: BaseException | None = None
        self._cancelled = False
        self._thread: threading.Thread | None = None
        self._dfd = -1
        self._fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if direct:
                self._dfd = _open_direct(self.tmp)
            self._reserve()
        except OSError:
            self.abort()
            raise
        self._thread = threading.Thread(target=self._drain, name="fmtconv-write", daemon=True)
        self._thread.start()
        self._place(0, np.frombuffer(header, dtype=np.uint8))

    def _reserve(self) -> None:
        """Size the file; with direct I/O also reserve its blocks (a full disk fails here, and the direct writes then
        allocate nothing)."""
        if self._dfd >= 0:
            try:
                os.posix_fallocate(self._fd, 0, self.size)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        os.ftruncate(self._fd, self.size)

    @property
    def direct(self) -> bool:
        """Whether full chunks bypass the page cache."""
        return self._dfd >= 0

    # ---- the workers' side ---------------------------------------------------------------------
    def write_at(self, name: str, offset: int, data: np.ndarray | bytes | memoryview) -> None:
        """Write bytes of region (tensor) `name` starting `offset` bytes into it."""
        start, n = self._offsets[name]
        buf = _as_bytes(data)
        if offset < 0 or offset + buf.nbytes > n:
            raise FmtconvError(f"write of {buf.nbytes} bytes at {offset} overruns its {n} bytes", file=self.path, tensor=name)
        self._place(start + offset, buf)
        with self._lock:
            self._written[name] += buf.nbytes

    def _place(self, pos: int, buf: np.ndarray) -> None:
        done = 0
        while done < buf.nbytes:
            i, at = divmod(pos + done, CHUNK_BYTES)
            take = min(CHUNK_BYTES - at, buf.nbytes - done)
            chunk = self._open(i)
            piece = buf[done : done + take]
            if chunk.buf is None:
                _pwrite_all(self._fd, piece, pos + done)
            else:
                chunk.buf[at : at + take] = piece  # numpy copies without the GIL
            self._fill(chunk, take)
            done += take

    def _open(self, i: int) -> _Chunk:
        if self._error is not None:  # the writer thread failed (a full disk): stop the workers too
            raise self._error
        with self._lock:
            chunk = self._chunks.get(i)
            if chunk is None:
                length = min(CHUNK_BYTES, self.size - i * CHUNK_BYTES)
                staged = self._staged < STAGED_CHUNKS and i < len(self._digests) - 1
                chunk = self._chunks[i] = _Chunk(i, length, self._pool.get() if staged else None)
                if staged:
                    self._staged += 1
                else:
                    self._through.append(i)
            return chunk

    def _fill(self, chunk: _Chunk, n: int) -> None:
        with self._lock:
            chunk.filled += n
            done = chunk.filled >= chunk.length
            if done:
                del self._chunks[chunk.index]
                if chunk.buf is not None:
                    self._staged -= 1
        if done and chunk.buf is not None:
            self._queue.put(chunk)

    # ---- the writer thread -----------------------------------------------------------------------
    def _drain(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while len(batch) < BATCH_CHUNKS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            if self._error is None and not self._cancelled:
                try:
                    self._write(sorted(batch, key=lambda c: c.index))
                except BaseException as e:  # raised again in the workers and by close()
                    self._error = e
            for c in batch:
                assert c.buf is not None
                self._pool.put(c.buf)
                c.buf = None
            if stop:
                return

    def _write(self, batch: list[_Chunk]) -> None:
        for c in batch:
            assert c.buf is not None
            self._digests[c.index] = xxhash.xxh3_128(c.buf[: c.length]).digest()
        run: list[_Chunk] = []
        for c in batch:
            if run and c.index != run[-1].index + 1:
                self._write_run(run)
                run = []
            run.append(c)
        self._write_run(run)

    def _write_run(self, run: list[_Chunk]) -> None:
        """Consecutive full chunks: one pwritev, direct where the descriptor allows it."""
        offset = run[0].index * CHUNK_BYTES
        bufs = [c.buf[: c.length] for c in run if c.buf is not None]
        total = sum(b.nbytes for b in bufs)
        fd = self._dfd if self._dfd >= 0 and total % ALIGN == 0 else self._fd
        done = 0
        if hasattr(os, "pwritev"):
            try:
                done = os.pwritev(fd, bufs, offset)
            except OSError as e:
                if fd != self._dfd or e.errno != errno.EINVAL:
                    raise
                os.close(self._dfd)  # the filesystem opened it but refuses direct writes: page cache from now on
                self._dfd = -1
        for b in bufs:  # the rest of a short write (or all of it, without pwritev), through the page cache
            if done < b.nbytes:
                _pwrite_all(self._fd, b[done:], offset + done)
            offset += b.nbytes
            done = max(0, done - b.nbytes)

    # ---- closing ---------------------------------------------------------------------------------
    def _join(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def close(self) -> Path:
        self._join()
        if self._error is not None:
            err = self._error
            self.abort()
            raise err
        short = [k for k, (_, n) in self._offsets.items() if self._written[k] != n]
        if short or self._chunks:
            self.abort()
            raise FmtconvError("closed before every tensor was written", file=self.path, tensor=short[0] if short else None)
        try:
            if self._through:
                with open(self.tmp, "rb", buffering=0) as f:
                    for i in self._through:
                        self._digests[i] = xxhash.xxh3_128(_read_chunk(f, i)).digest()
            os.fsync(self._fd)
        except OSError:
            self.abort()
            raise
        self._close_fds()
        os.replace(self.tmp, self.path)
        self.digest = _combine([d for d in self._digests if d is not None])
        return self.path

    def _close_fds(self) -> None:
        for fd in (self._fd, self._dfd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._dfd = -1

    def abort(self) -> None:
        """Stop the writer thread, hand the buffers back, remove the unfinished file."""
        self._cancelled = True  # chunks still queued are dropped, not written
        self._join()
        with self._lock:
            for c in self._chunks.values():
                if c.buf is not None:
                    self._pool.put(c.buf)
            self._chunks.clear()
        self._close_fds()
        self.tmp.unlink(missing_ok=True)


def _read_chunk(f, i: int) -> bytes:
    f.seek(i * CHUNK_BYTES)
    parts, left = [], CHUNK_BYTES
    while left:
        b = f.read(left)
        if not b:
            break
        parts.append(b)
        left -= len(b)
    return b"".join(parts)


def shard_digest(path: str | os.PathLike) -> str:
    """A finished shard's digest, as ShardWriter computed it while writing (chunk by chunk, then over the chunks)."""
    digests = []
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        for i in range(-(-size // CHUNK_BYTES)):
            digests.append(xxhash.xxh3_128(_read_chunk(f, i)).digest())
    return _combine(digests)
