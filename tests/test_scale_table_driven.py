"""The table-driven fast paths write the same bytes as the float path (codec decode -> round -> affine_quantize).

kernels_ref.table_driven.affine_quantize_mxfp4 (MXFP4 -> affine) and fp8_e8m0_rows_to_dtype (FP8 x E8M0
-> compute dtype) against the codecs and kernels_ref.affine_quantize, every dtype, backend, bit width and
group size, degenerate blocks and extreme scales included; then whole conversions with the fast paths
switched off must give the same bundle.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from fmtconv import kernels_ref
from fmtconv.convert import convert
from fmtconv.convert import pipeline as pipeline_mod
from fmtconv.formats.fp8_block import Fp8BlockCodec
from fmtconv.errors import FmtconvError
from fmtconv.formats import get_codec
from fmtconv.formats.base import SourceGroup
from fmtconv.kernels_ref.table_driven import affine_quantize_mxfp4, fp8_e8m0_rows_to_dtype

DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))
REPO = Path(__file__).resolve().parents[1]


def _mxfp4_rows(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed codes and E8M0 scales: random rows, then rows of degenerate blocks and extreme scales."""
    packed = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scales = rng.integers(115, 125, (n, k // 32), dtype=np.uint8)
    blocks = packed.reshape(-1, 16)
    sflat = scales.reshape(-1)
    m = len(blocks)
    pick = rng.choice(m, size=m // 2, replace=False)
    for j, b in enumerate(pick):
        kind = j % 8
        if kind == 0:
            blocks[b] = 0x00  # all +0
        elif kind == 1:
            blocks[b] = 0x88  # all -0
        elif kind == 2:
            blocks[b] = 0x80 | (rng.integers(0, 8, 16) + 8)  # only negatives and -0: GPU w_max = 0
        elif kind == 3:
            blocks[b] = rng.integers(0, 8, 16) * 17  # positives only
        elif kind == 4:
            blocks[b] = 0x77  # one value (6.0)
        elif kind == 5:
            blocks[b] = rng.choice([0x12, 0x21, 0x9A, 0xA9], 16)  # few values
        elif kind == 6:
            sflat[b] = rng.choice([0, 1, 2, 20, 60, 100, 126, 127, 128, 140, 141, 142, 150, 200, 250, 252])
    return packed, scales


def _reference(packed, scales, group_size, bits, dtype, backend):
    """The float path the pipeline takes without the fast path: MXFP4 codec decode, Exact.to, affine_quantize."""
    n, half = packed.shape
    group = SourceGroup("w.weight", "mxfp4", {"weight": "w.weight", "scale": "w.scale"}, (n, half * 2), {"layout": "deepseek_v4"})
    exact = get_codec("mxfp4").decode({"weight": packed.view(np.int8), "scale": scales.view(ml_dtypes.float8_e8m0fnu)}, group,
                                      compute_dtype=dtype)
    return kernels_ref.affine_quantize(exact.to(dtype), group_size, bits, backend=backend)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # extreme scales overflow float32 ranges in both paths alike
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("backend", ["cpu", "metal"])
def test_affine_quantize_mxfp4_equals_the_float_path(dtype: np.dtype, backend: str) -> None:
    rng = np.random.default_rng(7)
    for group_size in (32, 64, 128):
        for bits in (2, 3, 4, 5, 6, 8):
            packed, scales = _mxfp4_rows(rng, 16, 512)
            # Split rows so that overflowing blocks (float16) stay in their own chunk of rows.
            for rows in (slice(0, 8), slice(8, 16)):
                p, s = packed[rows], scales[rows]
                got = affine_quantize_mxfp4(p, s, group_size, bits, dtype=dtype, backend=backend)
                try:
                    want = _reference(p, s, group_size, bits, dtype, backend)
                except FmtconvError:
                    assert got is None  # the float path refuses: the table route must not write anything
                    continue
                if got is None:  # a table row holds inf for a code these blocks do not use: float path decides
                    continue
                for g, w in zip(got, want):
                    assert g.dtype == w.dtype and g.shape == w.shape
                    assert g.tobytes() == w.tobytes(), (dtype, backend, group_size, bits)


def test_affine_quantize_mxfp4_takes_the_table_route_for_ordinary_scales() -> None:
    rng = np.random.default_rng(3)
    packed, scales = rng.integers(0, 256, (4, 256), dtype=np.uint8), rng.integers(100, 140, (4, 16), dtype=np.uint8)
    for dtype in DTYPES:
        assert affine_quantize_mxfp4(packed, scales, 64, 4, dtype=dtype, backend="metal") is not None


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
def test_fp8_e8m0_rows_equal_the_codec_decode(dtype: np.dtype) -> None:
    rng = np.random.default_rng(11)
    codec = get_codec("fp8_block")
    for shape, block in (((2, 300, 256), (128, 128)), ((384, 512), (128, 128)), ((96, 64), (32, 32))):
        *lead, out, k = shape
        mats = int(np.prod(lead)) if lead else 1
        codes = rng.integers(0, 256, shape, dtype=np.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x10
        sshape = (*lead, -(-out // block[0]), -(-k // block[1]))
        scales = rng.integers(100, 140, sshape, dtype=np.uint8)
        group = SourceGroup("w.weight", "fp8_block", {"weight": "w.weight", "scale": "w.scale"}, shape,
                            {"layout": "deepseek_v4", "block": block, "scale_kind": "e8m0"})
        parts = {"weight": codes.view(ml_dtypes.float8_e4m3fn), "scale": scales.view(ml_dtypes.float8_e8m0fnu)}
        rows = mats * out
        for start, stop in ((0, rows), (5, rows - 7), (out - 1, min(rows, out + 130))):
            got = fp8_e8m0_rows_to_dtype(codes.reshape(-1, k)[start:stop], scales, start, out, block, dtype)
            try:
                want = codec.decode(parts, group, compute_dtype=dtype, rows=(start, stop)).to(dtype)
            except FmtconvError:
                assert got is None
                continue
            if np.issubdtype(want.dtype, np.floating) and not np.isfinite(want.astype(np.float32)).all():
                assert got is None  # inf in dtype: the float path's affine_quantize refuses it
                continue
            assert got is not None and got.dtype == want.dtype
            assert got.tobytes() == want.tobytes(), (shape, start, stop)
    nan = np.full((4, 128), 0x7F, dtype=np.uint8)
    assert fp8_e8m0_rows_to_dtype(nan, np.full((1, 1), 127, np.uint8), 0, 4, (128, 128), DTYPES[0]) is None


def _without_fast_paths(monkeypatch) -> None:
    monkeypatch.setattr(pipeline_mod.Converter, "_affine_from_mxfp4", lambda self, *a, **k: None)
    monkeypatch.setattr(pipeline_mod.Converter, "_affine_from_fp8", lambda self, *a, **k: None)
    monkeypatch.setattr(Fp8BlockCodec, "decode_to", lambda *a, **k: None)


def _bundle(out: Path) -> dict[str, bytes]:
    """Weights and index (config.json and the model card name the output directory)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith((".safetensors", ".index.json"))}


@pytest.mark.parametrize("recipe,backend,dtype", [("q4q8", "metal", None), ("q4q8", "cpu", "float16"),
                                                  ("mixed_3_6", "cpu", None), ("q8_5", "metal", "float32")])
def test_conversions_are_the_same_without_the_fast_paths(tmp_path: Path, monkeypatch, recipe, backend, dtype) -> None:
    from fmtconv.convert.bench.data import generate_checkpoint

    sources = [REPO / "fixtures" / "deepseek-v4-tiny",
               generate_checkpoint(tmp_path / "synth", 0, quiet=True, hidden=256, moe_inter=128, experts=4, vocab=256, layers=2)]
    for i, src in enumerate(sources):
        kw = {"recipe": recipe, "kernel_backend": backend, "compute_dtype": dtype, "workers": 2}
        used = {"mxfp4": 0, "fp8": 0}
        affine, values = pipeline_mod.Converter._affine_from_mxfp4, Fp8BlockCodec.decode_to

        def counted_affine(self, *a, **k):
            r = affine(self, *a, **k)
            used["mxfp4"] += r is not None
            return r

        def counted_values(*a, **k):
            r = values(*a, **k)
            used["fp8"] += r is not None
            return r

        with monkeypatch.context() as m:
            m.setenv("FMTCONV_KERNELS", "reference")  # the NumPy table routes (the compiled ones: test_convert_kernel_paths.py)
            m.setattr(pipeline_mod.Converter, "_affine_from_mxfp4", counted_affine)
            m.setattr(Fp8BlockCodec, "decode_to", counted_values)
            convert(src, tmp_path / f"fast{i}", **kw)
        assert used["mxfp4"] > 0 and (used["fp8"] > 0 or recipe == "mixed_3_6"), used
        with monkeypatch.context() as m:
            m.setenv("FMTCONV_KERNELS", "reference")
            _without_fast_paths(m)
            convert(src, tmp_path / f"slow{i}", **kw)
        assert _bundle(tmp_path / f"fast{i}") == _bundle(tmp_path / f"slow{i}")
