"""Fuzzing the safetensors header parser (formats/safetensors_io.py) with hypothesis.

Every case is written to a file and opened with `SafetensorsFile`: the only exception allowed out is
FmtconvError (naming the file); a header that parses must describe tensors that really lie inside the
file, and every tensor must then read back through `array()` and `raw()`. Four strategies, FUZZ_CASES
examples each (2,400 per run); time stays bounded by the example count (no deadline, no database).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fmtconv.errors import FmtconvError
from fmtconv.formats.dtypes import BY_NAME
from fmtconv.formats.safetensors_io import SafetensorsFile, TensorSpec, encode_header

FUZZ_CASES = 600  # per strategy; 4 strategies -> 2,400 cases per run (the README's reliability section says so)
SETTINGS = settings(max_examples=FUZZ_CASES, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])

DTYPES = sorted(BY_NAME)
u64 = st.integers(0, 2**64 - 1)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                           max_leaves=12)


def check_file(path: Path, content: bytes) -> str:
    """Write `content` to `path` and open it; returns 'refused' or 'parsed'. Anything but FmtconvError fails the test."""
    path.write_bytes(content)
    try:
        f = SafetensorsFile(path)
    except FmtconvError as e:
        assert e.file == str(path) and str(e).startswith(f"file {path}")
        return "refused"
    try:
        size = len(content)
        (n,) = struct.unpack("<Q", content[:8])
        for name, info in f.tensors.items():
            assert 8 + n <= info.start <= info.end <= size
            assert info.nbytes == BY_NAME[info.dtype].nbytes(info.shape)
            raw = f.raw(name)
            assert raw.nbytes == info.nbytes and raw.tobytes() == content[info.start : info.end]
            a = f.array(name)
            assert a.nbytes == info.nbytes
            f.release(name)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in f.metadata.items())
    finally:
        f.close()
    return "parsed"


def framed(header: bytes, data_len: int, length_delta: int = 0) -> bytes:
    return struct.pack("<Q", max(0, len(header) + length_delta)) + header + bytes(i % 251 for i in range(data_len))


# ---- strategy 1: arbitrary bytes, and arbitrary bytes behind a plausible length ------------------------------------
@st.composite
def byte_strings(draw) -> bytes:
    body = draw(st.binary(max_size=400))
    if draw(st.booleans()):
        return body
    n = draw(st.one_of(st.just(len(body)), st.integers(0, len(body) + 16), u64))
    return struct.pack("<Q", n) + body


# ---- strategy 2: generated headers: tensors laid out back to back, one of them (or the whole header) odd -------------
@st.composite
def odd_entry(draw, data_len: int):
    """An entry that breaks one rule at a time (or none: some of these are legal edge cases)."""
    kind = draw(st.integers(0, 7))
    dtype = draw(st.sampled_from(DTYPES))
    begin = draw(st.integers(0, data_len + 2))
    if kind == 0:
        return draw(json_values)
    if kind == 1:  # unknown or non-string dtype
        return {"dtype": draw(st.one_of(st.text(max_size=8), json_scalars)), "shape": [1], "data_offsets": [0, 1]}
    if kind == 2:  # odd shapes: negative, bool, float, string, None, huge
        dims = st.one_of(st.integers(-3, 6), st.integers(2**62, 2**66), st.sampled_from([True, 1.0, "2", None]))
        return {"dtype": dtype, "shape": draw(st.lists(dims, max_size=4)), "data_offsets": [begin, begin + draw(st.integers(0, 8))]}
    if kind == 3:  # odd offsets: wrong count, types, out of range, reversed
        offs = draw(st.lists(st.one_of(st.integers(-5, data_len + 5), st.integers(2**63, 2**65), json_scalars), max_size=3))
        return {"dtype": dtype, "shape": [draw(st.integers(0, 4))], "data_offsets": offs}
    if kind == 4:  # a key missing, or an extra one
        entry = {"dtype": "U8", "shape": [1], "data_offsets": [begin, begin + 1]}
        entry.pop(draw(st.sampled_from(sorted(entry)))) if draw(st.booleans()) else entry.update({draw(st.text(max_size=4)): 1})
        return entry
    if kind == 5:  # zero-size tensor whose other axes are absurd
        dims = draw(st.lists(st.integers(2**31, 2**66), min_size=1, max_size=3))
        return {"dtype": dtype, "shape": list(draw(st.permutations([0, *dims]))), "data_offsets": [begin, begin]}
    if kind == 6:  # more axes than NumPy handles
        return {"dtype": "U8", "shape": [1] * draw(st.integers(20, 80)), "data_offsets": [0, 1]}
    shape = draw(st.lists(st.integers(0, 5), max_size=3))  # a legal-looking tensor placed anywhere (overlaps, gaps)
    nb = BY_NAME[dtype].nbytes(tuple(shape))
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + (nb if nb is not None else 1)]}


@st.composite
def generated_files(draw) -> bytes:
    header: dict = {}
    offset = 0
    for k in range(draw(st.integers(0, 4))):  # well-formed tensors, back to back
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 5), max_size=3))
        nb = BY_NAME[dtype].nbytes(tuple(shape))
        if nb is None:
            shape, nb = shape + [8], BY_NAME[dtype].nbytes(tuple(shape + [8]))
        header[f"w{k}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nb]}
        offset += nb
    data_len = offset + draw(st.sampled_from([0, 0, 0, 1, 7]))
    if draw(st.integers(0, 4)):
        header[draw(st.sampled_from(["odd", "w0", "__metadata__"]))] = draw(odd_entry(data_len))
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3), json_values))
    keys = draw(st.permutations(list(header)))
    body = json.dumps({k: header[k] for k in keys}).encode() if draw(st.integers(0, 9)) else json.dumps(draw(json_values)).encode()
    body += b" " * draw(st.integers(0, 7))
    delta = draw(st.sampled_from([0, 0, 0, 0, -1, 1, -8, 8]))
    return framed(body, data_len, delta)


# ---- strategy 3: valid files from the writer's own header encoder, then damaged --------------------------------------
@st.composite
def valid_files(draw) -> bytes:
    specs = []
    for k in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        if BY_NAME[dtype].nbytes(shape) is None:
            shape = shape + (8,)
        specs.append(TensorSpec(f"t{k}", dtype, shape))
    meta = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)))
    head = encode_header(specs, meta)
    data = sum(s.nbytes for s in specs)
    return head + bytes(data) + b"\0" * draw(st.integers(0, 8))


@st.composite
def damaged_files(draw) -> bytes:
    content = bytearray(draw(valid_files()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 3))
        if op == 0 and content:  # flip a byte anywhere (length field included)
            i = draw(st.integers(0, len(content) - 1))
            content[i] = draw(st.integers(0, 255))
        elif op == 1 and content:  # cut the file short
            del content[draw(st.integers(0, len(content) - 1)) :]
        elif op == 2:  # a JSON-significant character somewhere in the header
            i = draw(st.integers(0, len(content)))
            content[i:i] = draw(st.sampled_from([b"{", b"}", b"[", b"]", b",", b'"', b":", b"-", b"9" * 30, b"\\u", b"\xff"]))
        else:  # grow the data area
            content += b"\0" * draw(st.integers(1, 9))
    return bytes(content)


# ---- strategy 4: deep nesting and giant numbers (json.loads raises RecursionError / ValueError on these) -------------
@st.composite
def hostile_json(draw) -> bytes:
    depth = draw(st.integers(1, 3000)) * draw(st.sampled_from([1, 1, 40]))
    choice = draw(st.integers(0, 3))
    if choice == 0:
        body = b"[" * depth + b"]" * draw(st.integers(0, depth))
    elif choice == 1:
        body = b'{"a":' * depth + b"1" + b"}" * draw(st.integers(0, depth))
    elif choice == 2:
        digits = b"9" * draw(st.integers(1, 6000))
        body = b'{"t": {"dtype": "U8", "shape": [' + digits + b'], "data_offsets": [0, 1]}}'
    else:
        body = b'{"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, ' + draw(st.sampled_from([b"1e999", b"-0", b"1.0", b"NaN", b"Infinity", b"0x1"])) + b"]}}"
    return framed(body, 8)


def _run(tmp_path: Path, strategy) -> dict[str, int]:
    counts = {"refused": 0, "parsed": 0}
    path = tmp_path / "fuzz.safetensors"

    @SETTINGS
    @given(strategy)
    def case(content: bytes) -> None:
        counts[check_file(path, content)] += 1

    case()
    assert sum(counts.values()) >= FUZZ_CASES, counts
    return counts


def test_fuzz_arbitrary_bytes(tmp_path: Path) -> None:
    _run(tmp_path, byte_strings())


def test_fuzz_generated_headers(tmp_path: Path) -> None:
    counts = _run(tmp_path, generated_files())
    assert counts["parsed"] > 0 and counts["refused"] > 0, counts


def test_fuzz_damaged_valid_files(tmp_path: Path) -> None:
    counts = _run(tmp_path, damaged_files())
    assert counts["parsed"] > 0 and counts["refused"] > 0, counts


def test_fuzz_hostile_json(tmp_path: Path) -> None:
    counts = _run(tmp_path, hostile_json())
    assert counts["refused"] > 0, counts


def test_valid_files_always_parse(tmp_path: Path) -> None:
    """The control: files from the writer's own encoder are never refused (so refusals above are real findings)."""

    @settings(max_examples=100, deadline=None, database=None)
    @given(valid_files())
    def case(content: bytes) -> None:
        assert check_file(tmp_path / "ok.safetensors", content) == "parsed"

    case()


def test_readme_counts_stay_true() -> None:
    """The README's Reliability section states the class count and the fuzz cases per run; keep them true."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"^## Reliability\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if m is None:
        import pytest

        pytest.skip("README has no Reliability section yet")
    classes = len([p for p in Path(__file__).parent.glob("test_reliability_*.py") if "fuzz" not in p.name])
    assert f"**{classes} of 15**" in m.group(1)
    assert f"**{4 * FUZZ_CASES:,}**" in m.group(1) and f"× {FUZZ_CASES}" in m.group(1)
