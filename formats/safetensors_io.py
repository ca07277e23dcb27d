"""Safetensors reading and writing for every dtype published FP4/FP8 checkpoints use.

File layout per the safetensors spec (huggingface/safetensors README, "Format"):
8 bytes little-endian u64 header length N, N bytes of JSON header, then the data area;
each tensor's `data_offsets` are [begin, end) relative to the start of the data area.
The safetensors package's NumPy loader refuses F8_E8M0 and F4, so we parse the header
ourselves and map byte ranges with NumPy over an mmap (zero-copy, read-only).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmtconv.errors import FmtconvError
from fmtconv.formats.dtypes import dtype_name_for, stored_dtype
from fmtconv.formats.shard_writer import ChunkPool, ShardWriter

INDEX_NAME = "model.safetensors.index.json"
# mlx_lm.utils.MAX_FILE_SIZE_GB = 5 (GiB, `<< 30`); we use the same cap.
DEFAULT_SHARD_BYTES = 5 << 30
# Safetensors caps the header at 100 MB (safetensors/src/tensor.rs, MAX_HEADER_SIZE).
MAX_HEADER_BYTES = 100_000_000
# Views need NumPy-sized shapes: at most NPY_MAXDIMS axes (32 in NumPy 1.x) and a byte size that fits intp.
MAX_AXES = 32


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: file, dtype string, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _parse_header(path: Path, raw: bytes, file_size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header and return tensor infos (absolute offsets) and metadata."""
    if len(raw) < 8:
        raise FmtconvError(f"file is {len(raw)} bytes, shorter than the 8-byte header length", file=path)
    (n,) = struct.unpack("<Q", raw[:8])
    if n > file_size - 8:
        raise FmtconvError(f"header length {n} exceeds the file size {file_size} minus 8", file=path)
    if n > MAX_HEADER_BYTES:
        raise FmtconvError(f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit", file=path)
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, ints over 4300 digits
        raise FmtconvError(f"header is not well-formed UTF-8 JSON ({e})", file=path) from None
    if not isinstance(header, dict):
        raise FmtconvError(f"header must be a JSON object, got {type(header).__name__}", file=path)
    data_start = 8 + n
    data_size = file_size - data_start
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise FmtconvError("__metadata__ must be an object of string to string", file=path)
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise FmtconvError("entry must be an object with dtype, shape, data_offsets", file=path, tensor=name)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str):
            raise FmtconvError(f"dtype must be a string, got {dtype!r}", file=path, tensor=name)
        sd = stored_dtype(dtype)
        if sd is None:
            raise FmtconvError(f"unknown dtype {dtype!r}", file=path, tensor=name)
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise FmtconvError(f"shape must be a list of non-negative integers, got {shape!r}", file=path, tensor=name)
        if len(shape) > MAX_AXES:
            raise FmtconvError(f"shape has {len(shape)} axes; at most {MAX_AXES} are supported", file=path, tensor=name)
        if math.prod(d for d in shape if d) * sd.numpy.itemsize >= 2**63:
            raise FmtconvError(f"shape {shape} is too large to address (2**63 bytes or more)", file=path, tensor=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise FmtconvError(f"data_offsets must be [begin, end] integers, got {offsets!r}", file=path, tensor=name)
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise FmtconvError(
                f"data_offsets [{begin}, {end}] lie outside the data area of {data_size} bytes", file=path, tensor=name
            )
        expected = sd.nbytes(tuple(shape))
        if expected is None:
            raise FmtconvError(f"shape {shape} of packed dtype {dtype} does not fill whole bytes", file=path, tensor=name)
        if end - begin != expected:
            raise FmtconvError(
                f"holds {end - begin} bytes but shape {shape} x {dtype} needs {expected}", file=path, tensor=name
            )
        infos[name] = TensorInfo(name, dtype, tuple(shape), path, data_start + begin, data_start + end)
    spans = sorted((i.start, i.end, i.name) for i in infos.values() if i.end > i.start)
    for (s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FmtconvError(f"byte range overlaps that of tensor {n0!r}", file=path, tensor=n1)
    return infos, metadata


class SafetensorsFile:
    """One .safetensors file: validated header, zero-copy read-only views over an mmap."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) == 8:
                    (n,) = struct.unpack("<Q", head)
                    head += f.read(min(n, MAX_HEADER_BYTES + 1))
        except OSError as e:
            raise FmtconvError(f"cannot read ({e.strerror})", file=self.path) from None
        self.tensors, self.metadata = _parse_header(self.path, head, self.size)
        self._mmap: mmap.mmap | None = None
        self._map_lock = threading.Lock()

    def _buffer(self) -> mmap.mmap:
        if self._mmap is None:
            with self._map_lock:  # worker threads and the read-ahead may ask at once: map the file once
                if self._mmap is None:
                    with open(self.path, "rb") as f:
                        self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mmap

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view (packed dtypes included)."""
        info = self._info(name)
        if info.nbytes == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(self._buffer(), dtype=np.uint8, count=info.nbytes, offset=info.start)

    def array(self, name: str) -> np.ndarray:
        """The tensor as a read-only NumPy view; packed sub-byte dtypes come back as raw uint8 bytes."""
        info = self._info(name)
        sd = stored_dtype(info.dtype)
        assert sd is not None
        raw = self.raw(name)
        if sd.packed:
            return raw
        return raw.view(sd.numpy).reshape(info.shape)

    def release(self, name: str, rows: tuple[int, int, int] | None = None) -> None:
        """Drop the tensor's mapped pages from this process (they stay in the page cache); keeps RSS bounded.

        rows = (start, stop, total): only the pages of that share of the tensor (its rows, when it is
        stored row by row), so other threads' rows of the same tensor stay mapped."""
        self._advise(name, getattr(mmap, "MADV_DONTNEED", None), rows)

    def release_all(self) -> None:
        """Drop every mapped page of the file from this process.  Releasing tensor by tensor leaves a few pages around
        each: the kernel's fault-around maps a faulting page's neighbours, the next tensor's first pages included."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, 0, self.size)
            except (OSError, ValueError):
                pass

    def will_need(self, name: str, rows: tuple[int, int, int] | None = None) -> None:
        """Start reading the tensor's pages (or the share `rows` selects, as in `release`) in the background."""
        self._buffer()
        self._advise(name, getattr(mmap, "MADV_WILLNEED", None), rows)

    def _advise(self, name: str, advice: int | None, rows: tuple[int, int, int] | None) -> None:
        if self._mmap is None or advice is None:
            return
        info = self._info(name)
        lo, hi = info.start, min(self.size, info.end)
        if rows is not None and rows[2] > 0:
            start, stop, total = rows
            n = info.end - info.start
            lo, hi = info.start + n * start // total, min(hi, info.start + -(-n * stop // total))
        page = mmap.PAGESIZE
        lo = lo // page * page
        if hi > lo:
            try:
                self._mmap.madvise(advice, lo, hi - lo)
            except (OSError, ValueError):
                pass

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FmtconvError("no such tensor in this file", file=self.path, tensor=name) from None

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views still alive; the map is freed with them
            self._mmap = None


class Checkpoint:
    """A checkpoint directory (sharded with an index, or loose .safetensors files) or a single file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FmtconvError("does not exist", file=self.path)
        self.files: dict[str, SafetensorsFile] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self.index_weight_map: dict[str, str] | None = None
        if self.path.is_file():
            self.root = self.path.parent
            self._add(self.path.name)
        else:
            self.root = self.path
            index = self.root / INDEX_NAME
            if index.exists():
                self._load_index(index)
            else:
                names = sorted(p.name for p in self.root.glob("*.safetensors"))
                if not names:
                    raise FmtconvError("no .safetensors files and no index", file=self.root)
                for n in names:
                    self._add(n)

    def _load_index(self, index: Path) -> None:
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            raise FmtconvError(f"index is not readable JSON ({e})", file=index) from None
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise FmtconvError("index has no weight_map object of tensor name to file name", file=index)
        self.index_weight_map = dict(wm)
        for fname in sorted(set(wm.values())):
            if not (self.root / fname).is_file():
                raise FmtconvError(
                    f"index names shard {fname!r}, which is missing", file=index, tensor=next(k for k, v in wm.items() if v == fname)
                )
            self._add(fname)
        for tname, fname in wm.items():
            if tname not in self.files[fname].tensors:
                raise FmtconvError(f"index maps it to {fname}, but that shard does not hold it", file=index, tensor=tname)
        unlisted = [t for t, info in self.tensors.items() if wm.get(t) != info.file.name]
        if unlisted:
            raise FmtconvError(
                f"shard {self.tensors[unlisted[0]].file.name} holds {len(unlisted)} tensor(s) the index does not list",
                file=index,
                tensor=unlisted[0],
            )

    def _add(self, fname: str) -> None:
        f = SafetensorsFile(self.root / fname)
        self.files[fname] = f
        for name, info in f.tensors.items():
            if name in self.tensors:
                raise FmtconvError(f"tensor also stored in {self.tensors[name].file.name}", file=f.path, tensor=name)
            self.tensors[name] = info

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise FmtconvError("tensor is not in the checkpoint", file=self.path, tensor=name) from None

    def array(self, name: str) -> np.ndarray:
        return self.files[self.info(name).file.name].array(name)

    def raw(self, name: str) -> np.ndarray:
        return self.files[self.info(name).file.name].raw(name)

    def release(self, name: str, rows: tuple[int, int, int] | None = None) -> None:
        self.files[self.info(name).file.name].release(name, rows)

    def will_need(self, name: str, rows: tuple[int, int, int] | None = None) -> None:
        """Read-ahead hint for a tensor (or a share of its rows); maps the file if needed."""
        self.files[self.info(name).file.name].will_need(name, rows)

    def release_all(self) -> None:
        """Drop every mapped page of every file from this process (SafetensorsFile.release_all)."""
        for f in self.files.values():
            f.release_all()

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class TensorSpec:
    """What the writer needs before data: name, safetensors dtype string and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        sd = stored_dtype(self.dtype)
        if sd is None:
            raise FmtconvError(f"unknown dtype {self.dtype!r}", tensor=self.name)
        n = sd.nbytes(self.shape)
        if n is None:
            raise FmtconvError(f"shape {self.shape} of packed dtype {self.dtype} does not fill whole bytes", tensor=self.name)
        return n

    @classmethod
    def of(cls, name: str, array: np.ndarray) -> "TensorSpec":
        return cls(name, dtype_name_for(array.dtype), tuple(array.shape))


def alignment(dtype: str) -> int:
    """The byte alignment a tensor of this dtype needs: its element size (1 for the packed sub-byte floats)."""
    sd = stored_dtype(dtype)
    return max(1, sd.bits // 8) if sd is not None else 1


def aligned_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """The order the tensors are laid out in a file so that every data offset is a multiple of its dtype's size.

    The given order where it already is (a plan lays out each module's parts together), else the tensors sorted
    by element size, largest first, ties in the given order: safetensors' own writer sorts by dtype the same way
    (safetensors/src/tensor.rs, `prepare`), so that each offset is a sum of sizes that are multiples of it.  With
    the data area starting 8-byte aligned (encode_header), every tensor then starts aligned to its dtype's size.
    """
    specs = list(specs)
    offset = 0
    for s in specs:
        if offset % alignment(s.dtype):
            return sorted(specs, key=lambda t: -alignment(t.dtype))  # stable: ties keep the given order
        offset += s.nbytes
    return specs


def data_offsets(specs: Iterable[TensorSpec]) -> dict[str, tuple[int, int]]:
    """name -> (start, end) in the data area, for the tensors laid out in aligned_order."""
    out = {}
    offset = 0
    for s in aligned_order(specs):
        out[s.name] = (offset, offset + s.nbytes)
        offset += s.nbytes
    return out


def encode_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The 8-byte length plus JSON header for the tensors laid out in `aligned_order` (header entries in file order)."""
    specs = list(specs)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    by_name = {s.name: s for s in specs}
    for name, (start, end) in data_offsets(specs).items():
        s = by_name[name]
        header[name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [start, end]}
    body = json.dumps(header, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # pad so the data area starts 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(body)) + body


def write_header_only(path: str | os.PathLike, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None) -> Path:
    """A safetensors file whose header is real and whose data area is a hole (a sparse file: no data
    written, no disk used where the filesystem supports holes).  For checks that read only headers."""
    specs = list(specs)
    head = encode_header(specs, metadata)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(s.nbytes for s in specs))
    return path


class SafetensorsWriter:
    """Streams tensors into one file: header first (from specs), data in the specs' order, rename when complete.

    Data may arrive in pieces (row blocks); each piece lands at its tensor's aligned offset (aligned_order), so
    callers stream in their own order.  `close()` checks every byte arrived and only then renames `<name>.tmp`
    to its final name, so a crash never leaves a complete-looking file.
    """

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.specs = list(specs)
        self._expected = [s.nbytes for s in self.specs]
        self._i = 0
        self._written = 0
        self._f = open(self.tmp, "wb")
        header = encode_header(self.specs, metadata)
        self._f.write(header)
        offsets = data_offsets(self.specs)
        self._starts = [len(header) + offsets[s.name][0] for s in self.specs]
        self._pos = len(header)

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append bytes of the current tensor (a whole tensor or a contiguous piece of it)."""
        if isinstance(data, np.ndarray):
            buf = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        else:
            buf = memoryview(data).cast("B")
        while buf.nbytes:
            if self._i >= len(self.specs):
                raise FmtconvError("more data than the header announced", file=self.path)
            room = self._expected[self._i] - self._written
            take = min(room, buf.nbytes)
            at = self._starts[self._i] + self._written
            if at != self._pos:  # the caller's order is not the file's (aligned_order moved a tensor)
                self._f.seek(at)
            self._f.write(buf[:take])
            self._pos = at + take
            buf = buf[take:]
            self._written += take
            if self._written == self._expected[self._i]:
                self._i += 1
                self._written = 0
        while self._i < len(self.specs) and self._expected[self._i] == 0:
            self._i += 1

    def close(self) -> Path:
        while self._i < len(self.specs) and self._expected[self._i] == 0:
            self._i += 1
        if self._i != len(self.specs):
            self.abort()
            raise FmtconvError("closed before every tensor was written", file=self.path, tensor=self.specs[self._i].name)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


class PreallocatedSafetensorsWriter(ShardWriter):
    """A safetensors shard whose tensors are known up front: header written, tensors at their aligned offsets
    (data_offsets), pieces of them arriving in any order from any thread, staged and written behind
    (formats/shard_writer.py)."""

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: Mapping[str, str] | None = None, *,
                 pool: ChunkPool | None = None, direct: bool = True):
        header = encode_header(specs, metadata)
        regions = {name: (len(header) + a, b - a) for name, (a, b) in data_offsets(specs).items()}
        super().__init__(path, header, regions, pool=pool, direct=direct)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write whole arrays to one file, atomically."""
    specs = [TensorSpec.of(n, a) for n, a in tensors.items()]
    w = SafetensorsWriter(path, specs, metadata)
    try:
        for a in tensors.values():
            w.write(a)
    except BaseException:
        w.abort()
        raise
    return w.close()


def shard_names(count: int) -> list[str]:
    """mlx_lm's shard naming (`mlx_lm.utils.save_model`), kept for one shard too."""
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def assign_shards(units: Iterable[Sequence[TensorSpec]], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[list[TensorSpec]]:
    """Split tensors into shards in order, as mlx_lm.utils.make_shards does (an oversize unit gets its own);
    the tensors of one unit (e.g. a module's weight, scales and biases) always share a shard."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for unit in units:
        n = sum(s.nbytes for s in unit)
        if not shards or size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(unit)
        size += n
    return [aligned_order(shard) for shard in shards]  # each shard in the order its writer lays it out


def write_index(out_dir: str | os.PathLike, weight_map: Mapping[str, str], total_size: int, extra: Mapping[str, object] | None = None) -> Path:
    """Write model.safetensors.index.json (sorted weight_map, metadata.total_size), atomically."""
    out = Path(out_dir) / INDEX_NAME
    meta: dict[str, object] = {"total_size": int(total_size)}
    if extra:
        meta.update(extra)
    data = {"metadata": meta, "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=4) + "\n")
    os.replace(tmp, out)
    return out


def save_sharded(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write in-memory tensors as MLX-style shards plus the index."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec.of(n, a) for n, a in tensors.items()]
    groups = assign_shards([[s] for s in specs], max_shard_bytes)
    names = shard_names(len(groups))
    meta = {"format": "mlx"} if metadata is None else dict(metadata)
    weight_map: dict[str, str] = {}
    paths = []
    for fname, group in zip(names, groups):
        paths.append(write_safetensors(out / fname, {s.name: tensors[s.name] for s in group}, meta))
        weight_map.update({s.name: fname for s in group})
    write_index(out, weight_map, sum(s.nbytes for s in specs))
    return paths


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[TensorInfo, np.ndarray]]:
    """Every stored tensor with its view, in file then offset order."""
    for info in sorted(ckpt.tensors.values(), key=lambda i: (i.file.name, i.start)):
        yield info, ckpt.array(info.name)


__all__ = [
    "INDEX_NAME",
    "DEFAULT_SHARD_BYTES",
    "TensorInfo",
    "SafetensorsFile",
    "Checkpoint",
    "TensorSpec",
    "SafetensorsWriter",
    "PreallocatedSafetensorsWriter",
    "alignment",
    "aligned_order",
    "data_offsets",
    "encode_header",
    "write_safetensors",
    "shard_names",
    "assign_shards",
    "write_index",
    "save_sharded",
    "iter_tensors",
]

