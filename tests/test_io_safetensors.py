"""Safetensors reader/writer: every dtype round-trips, the safetensors package agrees, bad headers are refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fmtconv.errors import FmtconvError
from fmtconv.formats.dtypes import BY_NAME
from fmtconv.formats.safetensors_io import (
    INDEX_NAME,
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
    TensorSpec,
    save_sharded,
    write_safetensors,
)

RNG = np.random.default_rng(0)


def _random(dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
    d = BY_NAME[dtype_name]
    raw = RNG.integers(0, 256, size=int(np.prod(shape)) * d.numpy.itemsize, dtype=np.uint8)
    if dtype_name == "BOOL":
        raw = raw % 2
    return raw.view(d.numpy).reshape(shape)


UNPACKED = [n for n, d in BY_NAME.items() if not d.packed]


@pytest.mark.parametrize("dtype_name", UNPACKED)
def test_every_dtype_round_trips_bytes(tmp_path: Path, dtype_name: str) -> None:
    a = _random(dtype_name, (3, 5))
    write_safetensors(tmp_path / "t.safetensors", {"x": a}, {"format": "mlx"})
    f = SafetensorsFile(tmp_path / "t.safetensors")
    got = f.array("x")
    assert f.tensors["x"].dtype == dtype_name
    assert got.dtype == a.dtype and got.shape == a.shape
    assert got.tobytes() == a.tobytes()
    assert f.metadata == {"format": "mlx"}
    assert not got.flags.writeable  # a view over the read-only mmap, not a copy


def test_f8_types_come_back_as_ml_dtypes(tmp_path: Path) -> None:
    a = np.array([1.0, 2.0, 0.5], dtype=ml_dtypes.float8_e8m0fnu)
    b = np.array([1.5, -448.0], dtype=ml_dtypes.float8_e4m3fn)
    write_safetensors(tmp_path / "t.safetensors", {"s": a, "w": b})
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert f.array("s").dtype == np.dtype(ml_dtypes.float8_e8m0fnu)
    assert f.array("s").astype(np.float32).tolist() == [1.0, 2.0, 0.5]
    assert f.array("w").astype(np.float32).tolist() == [1.5, -448.0]


def test_packed_fp4_reads_as_raw_bytes(tmp_path: Path) -> None:
    raw = np.arange(8, dtype=np.uint8)
    w = SafetensorsWriter(tmp_path / "t.safetensors", [TensorSpec("p", "F4", (4, 4))])
    w.write(raw)
    w.close()
    f = SafetensorsFile(tmp_path / "t.safetensors")
    assert f.tensors["p"].shape == (4, 4)
    assert f.array("p").tobytes() == raw.tobytes()


def test_safetensors_package_reads_ours_and_we_read_theirs(tmp_path: Path) -> None:
    tensors = {n: _random(n, (2, 4)) for n in ["BF16", "F16", "F32", "I8", "U8", "I32", "I64", "U32", "F64"]}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    theirs = load_file(str(tmp_path / "ours.safetensors"))
    for n, a in tensors.items():
        assert theirs[n].tobytes() == a.tobytes()
    plain = {n: a for n, a in tensors.items() if n != "BF16"}  # numpy has no bfloat16 for safetensors.numpy
    save_file(plain, str(tmp_path / "theirs.safetensors"))
    f = SafetensorsFile(tmp_path / "theirs.safetensors")
    for n, a in plain.items():
        assert f.array(n).tobytes() == a.tobytes() and f.array(n).dtype == a.dtype


def test_sharded_checkpoint_and_index(tmp_path: Path) -> None:
    tensors = {f"layer.{i}.weight": _random("F32", (16, 16)) for i in range(5)}
    paths = save_sharded(tmp_path, tensors, max_shard_bytes=2048)
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 16 * 16 * 4
    assert set(index["weight_map"]) == set(tensors)
    ck = Checkpoint(tmp_path)
    for n, a in tensors.items():
        assert ck.array(n).tobytes() == a.tobytes()
    assert not list(tmp_path.glob("*.tmp"))


def _write_raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def _entry(dtype: str = "F32", shape: list[int] | None = None, offsets: list[int] | None = None) -> dict:
    return {"dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [0, 8] if offsets is None else offsets}


@pytest.mark.parametrize(
    "header, data, length, fragment",
    [
        ({"a": _entry()}, b"\0" * 8, 10_000, "header length"),
        (b"{not json", b"", None, "not well-formed"),
        ([1, 2], b"", None, "must be a JSON object"),
        ({"a": [1]}, b"\0" * 8, None, "must be an object"),
        ({"a": _entry(dtype="F7")}, b"\0" * 8, None, "unknown dtype"),
        ({"a": _entry(shape=[-1])}, b"\0" * 8, None, "non-negative"),
        ({"a": _entry(offsets=[0, 16])}, b"\0" * 8, None, "outside the data area"),
        ({"a": _entry(offsets=[0, 4])}, b"\0" * 8, None, "needs 8"),
        ({"a": _entry(), "b": _entry(offsets=[4, 12])}, b"\0" * 12, None, "overlaps"),
        ({"a": _entry(dtype="F4", shape=[3])}, b"\0" * 8, None, "whole bytes"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    ],
)
def test_header_violations_raise_package_error(tmp_path: Path, header, data, length, fragment) -> None:
    p = _write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(FmtconvError) as e:
        SafetensorsFile(p)
    assert fragment in str(e.value)
    assert "bad.safetensors" in str(e.value)


def test_error_names_the_tensor(tmp_path: Path) -> None:
    p = _write_raw(tmp_path / "bad.safetensors", {"blk.0.weight": _entry(dtype="Q4")}, b"\0" * 8)
    with pytest.raises(FmtconvError, match=r"blk\.0\.weight"):
        SafetensorsFile(p)


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "t.safetensors", {"a": np.zeros((64,), np.float32)})
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(raw[:-10])
    with pytest.raises(FmtconvError, match="outside the data area"):
        SafetensorsFile(tmp_path / "t.safetensors")


def test_index_faults(tmp_path: Path) -> None:
    save_sharded(tmp_path, {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)}, max_shard_bytes=16)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    index["weight_map"]["c"] = "model-00009-of-00009.safetensors"
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FmtconvError, match="missing"):
        Checkpoint(tmp_path)
    del index["weight_map"]["c"]
    index["weight_map"]["zz"] = index["weight_map"]["a"]
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FmtconvError, match="does not hold it"):
        Checkpoint(tmp_path)


def test_shard_tensor_missing_from_index(tmp_path: Path) -> None:
    save_sharded(tmp_path, {"a": np.zeros(4, np.float32), "b": np.ones(4, np.float32)})
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    del index["weight_map"]["b"]
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(FmtconvError, match="does not list"):
        Checkpoint(tmp_path)


def test_writer_refuses_short_data_and_leaves_nothing(tmp_path: Path) -> None:
    w = SafetensorsWriter(tmp_path / "t.safetensors", [TensorSpec("a", "F32", (4,))])
    w.write(np.zeros(2, np.float32))
    with pytest.raises(FmtconvError, match="before every tensor"):
        w.close()
    assert list(tmp_path.iterdir()) == []
