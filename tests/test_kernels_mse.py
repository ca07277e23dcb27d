"""The error-minimising affine encoder (kernels_ref.affine_mse, kernels_ref.mxfp4_mse) against MLX's min/max.

Per group, on random, adversarial and real-fixture data: the mse bundle's squared error is never higher than
that of MLX's own bytes (`mx.quantize`, run for real, for the CPU arithmetic; kernels_ref's bit-exact min/max
for the Metal arithmetic, which cannot run here), both dequantized the way the runtime does it.  Also: the
format is MLX's (shapes, dtypes, `mx.dequantize` reads it), results are deterministic and independent of how
rows are split, and the MXFP4 table's minimum is the exact minimum over its candidates.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest

from fmtconv.convert.pipeline import Converter, iter_jobs
from fmtconv.convert.plan import REQUANT, build_plan
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.formats.safetensors_io import Checkpoint
from fmtconv.kernels_ref import affine_dequantize, affine_quantize, fp_quantize
from fmtconv.kernels_ref.affine import dequantize_values, to_float32
from fmtconv.kernels_ref.affine_mse import affine_quantize_mse, group_sse
from fmtconv.kernels_ref.mxfp4_mse import affine_quantize_mxfp4_mse, candidate_table, pattern_table
from fmtconv.kernels_ref.table_driven import _value_table, affine_quantize_mxfp4

ROOT = Path(__file__).resolve().parents[1]
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32 = np.dtype(np.float16), np.dtype(np.float32)


def _groups_sse(x: np.ndarray, deq: np.ndarray, group_size: int) -> np.ndarray:
    d = deq.astype(np.float64).reshape(-1, group_size) - x.astype(np.float64).reshape(-1, group_size)
    return (d * d).sum(axis=1)


def _to_mx(a: np.ndarray) -> mx.array:
    return mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == BF16 else mx.array(a)


def _from_mx(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16)).view(BF16) if a.dtype == mx.bfloat16 else np.array(a)


def _mlx_dequant(wq, s, b, g: int, bits: int) -> np.ndarray:
    """mx.dequantize on the CPU (MLX's runtime arithmetic here), as float64."""
    out = mx.dequantize(mx.array(wq), _to_mx(np.asarray(s)), _to_mx(np.asarray(b)), group_size=g, bits=bits)
    return np.array(out.astype(mx.float32)).astype(np.float64)


def _assert_never_worse(x: np.ndarray, g: int, bits: int, backend: str, mse_out) -> None:
    """Per group: SSE(mse) <= SSE(MLX min/max), each dequantized with `backend`'s arithmetic."""
    if backend == "cpu":
        ref = [_from_mx(a) for a in mx.quantize(_to_mx(x), group_size=g, bits=bits)]  # MLX's own bytes
        e_ref = _groups_sse(x, _mlx_dequant(*ref, g, bits), g)
        e_mse = _groups_sse(x, _mlx_dequant(*mse_out, g, bits), g)
        # The mse bytes are read by MLX exactly as kernels_ref models it.
        np.testing.assert_array_equal(_mlx_dequant(*mse_out, g, bits).astype(np.float32),
                                      affine_dequantize(*mse_out, g, bits, backend="cpu").astype(np.float32))
    else:
        ref = affine_quantize(x, g, bits, backend=backend)
        e_ref = _groups_sse(x, affine_dequantize(*ref, g, bits, backend=backend), g)
        e_mse = _groups_sse(x, affine_dequantize(*mse_out, g, bits, backend=backend), g)
    worse = np.flatnonzero(e_mse > e_ref)
    assert worse.size == 0, f"{worse.size} groups worse, e.g. group {worse[:3]}: {e_mse[worse[:3]]} > {e_ref[worse[:3]]}"


# ---------------------------------------------------------------------------------------------
# The float path
# ---------------------------------------------------------------------------------------------


def _random(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape) * 0.02
    if kind == "laplace":
        return rng.laplace(0.0, 1.0, shape)
    if kind == "student2":  # very heavy tails: outliers in most groups
        return rng.standard_t(2, shape) * 3.0
    if kind == "uniform":
        return rng.uniform(-7.0, 3.0, shape)
    raise ValueError(kind)


@pytest.mark.parametrize("backend", ["cpu", "metal"])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_dense_never_worse_random(backend, dtype, bits):
    rng = np.random.default_rng([bits, {BF16: 1, F16: 2, F32: 3}[dtype], backend == "cpu"])
    for kind in ("normal", "laplace", "student2", "uniform"):
        for g in (32, 64, 128):
            x = _random(kind, (24, 512), rng).astype(np.float32).astype(dtype)
            out = affine_quantize_mse(x, g, bits, backend=backend)
            assert [a.shape for a in out] == [a.shape for a in affine_quantize(x, g, bits, backend=backend)]
            assert out[0].dtype == np.uint32 and out[1].dtype == dtype and out[2].dtype == dtype
            _assert_never_worse(x, g, bits, backend, out)


def _adversarial(g: int) -> list[np.ndarray]:
    """Groups (rows of g) that stress the search and MLX's edge/q0 rule."""
    rng = np.random.default_rng(g)
    ramp = np.arange(g, dtype=np.float64) % 16 * 0.25 - 1.0  # exactly representable on a 4-bit grid
    rows = [
        np.zeros(g), np.full(g, 1.0), np.full(g, -3.5), np.full(g, 1e-30), np.full(g, 6e4),
        np.where(np.arange(g) % 2, 1.0, -1.0),  # two values
        np.r_[np.zeros(g - 1), 1000.0],  # one outlier
        np.r_[rng.standard_normal(g - 1) * 1e-3, -50.0],
        -np.abs(rng.standard_normal(g)) - 1.0,  # all negative (GPU w_max starts at 0)
        np.abs(rng.standard_normal(g)) + 5.0,  # all positive, far from 0
        ramp, ramp * 1e-3, -ramp,
        np.r_[np.full(g // 2, 1e-20), np.full(g // 2, 1e20)],  # huge dynamic range
        np.linspace(-1.0, 1.0, g) ** 3,
        rng.standard_normal(g) * 1e-6,  # tiny values (float16 subnormals)
        np.r_[np.full(g - 2, 0.5), -0.5, 0.25],
    ]
    return rows


@pytest.mark.parametrize("backend", ["cpu", "metal"])
@pytest.mark.parametrize("dtype", [BF16, F16, F32], ids=["bf16", "f16", "f32"])
def test_dense_never_worse_adversarial(backend, dtype):
    for g in (32, 64, 128):
        rows = _adversarial(g)
        if dtype == F16:
            rows = [np.clip(r, -6e4, 6e4) for r in rows]
        x = np.stack(rows).astype(np.float32).astype(dtype)
        for bits in (2, 3, 4, 8):
            _assert_never_worse(x, g, bits, backend, affine_quantize_mse(x, g, bits, backend=backend))


def test_dense_exact_grid_stays_exact():
    """A group that MLX represents exactly is represented exactly by mse too (error 0 is not beaten)."""
    x = (np.arange(64 * 8) % 16 * 0.25 - 1.0).reshape(8, 64).astype(BF16)
    out = affine_quantize_mse(x, 64, 4, backend="cpu")
    assert np.array_equal(affine_dequantize(*out, 64, 4, backend="cpu").astype(np.float32), x.astype(np.float32))


def test_dense_refuses_nonfinite_naming_the_tensor():
    from fmtconv.errors import FmtconvError

    x = np.ones((2, 64), dtype=BF16)
    x[1, 3] = np.inf
    with pytest.raises(FmtconvError, match="'w.q'"):
        affine_quantize_mse(x, 64, 4, name="w.q")


def test_group_sse_is_the_runtime_error():
    """group_sse (the encoder's own measure) equals the error of MLX's CPU dequantize, computed here in float64."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((16, 256)).astype(BF16)
    wq, s, b = affine_quantize_mse(x, 64, 4, backend="cpu")
    from fmtconv.kernels_ref.packing import unpack_codes

    codes = unpack_codes(wq, 4).reshape(-1, 64)
    mine = group_sse(x.astype(np.float32).reshape(-1, 64), codes, s.astype(np.float32).reshape(-1), b.astype(np.float32).reshape(-1),
                     BF16, "cpu")
    np.testing.assert_allclose(mine, _groups_sse(x.astype(np.float32), _mlx_dequant(wq, s, b, 64, 4), 64), rtol=1e-12)


def test_fused_rounding_in_float32_equals_the_float64_model():
    """dequantize_values' float32 route for the GPU's one rounding (16-bit dtypes) equals _round_once in float64."""
    from fmtconv.kernels_ref.affine import _round_once, _round_once_f32

    rng = np.random.default_rng(0)
    for dt in (BF16, F16):
        for trial in range(12):
            n = 100_000
            q = rng.integers(0, 256, n).astype(np.float32)
            s = to_float32((rng.standard_normal(n) * 2.0 ** rng.integers(-20, 5)).astype(np.float32).astype(dt))
            b = to_float32((rng.standard_normal(n) * 2.0 ** rng.integers(-12, 8)).astype(np.float32).astype(dt))
            if trial % 3 == 0:  # cancellation: sums near zero and exact ties
                b = to_float32((-q * s * np.float32(rng.choice([1.0, 0.5, 1.5]))).astype(dt))
            want = _round_once(q.astype(np.float64) * s.astype(np.float64), b.astype(np.float64), dt).astype(np.float32)
            got = _round_once_f32(q * s, b, dt).astype(np.float32)
            assert np.array_equal(want, got, equal_nan=True), (dt, trial)


# ---------------------------------------------------------------------------------------------
# The MXFP4 route
# ---------------------------------------------------------------------------------------------


def _decode(packed: np.ndarray, codes: np.ndarray, dtype: np.dtype = BF16) -> np.ndarray:
    table = _value_table(dtype.name)[0]
    nib = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    return table[np.repeat(codes, 32, axis=1), nib].astype(dtype)


def _mxfp4_cases(rng: np.random.Generator) -> list[tuple[str, np.ndarray, np.ndarray]]:
    n, k = 32, 512
    cases = []
    p = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    cases.append(("random codes, exponents 2^-9..2^-6", p, (118 + rng.integers(0, 4, (n, k // 32))).astype(np.uint8)))
    cases.append(("random codes, exponents spread 0..12 below", p, (127 - rng.integers(0, 13, (n, k // 32))).astype(np.uint8)))
    w = rng.standard_normal((n, k)).astype(np.float32)
    wq, sc = fp_quantize(w, "mxfp4", backend="cpu")
    cases.append(("MLX mxfp4 of N(0,1)", np.ascontiguousarray(wq).view(np.uint8), sc))
    adv = np.zeros((n, k // 2), dtype=np.uint8)
    adv[1] = 0x77  # every value +6
    adv[2] = 0xFF  # every value -6
    adv[3] = 0x80  # +0 and -0
    adv[4, ::2] = 0x71  # 6 and 0.5
    adv[5] = rng.choice(np.array([0x12, 0x21, 0x9A], dtype=np.uint8), k // 2)  # few codes
    adv[6:] = rng.integers(0, 256, (n - 6, k // 2), dtype=np.uint8)
    exps = np.full((n, k // 32), 120, dtype=np.uint8)
    exps[7:10] = rng.integers(0, 255, (3, k // 32))  # any exponent, extremes included
    exps[10, ::2] = 126
    exps[10, 1::2] = 110  # offsets far beyond the table
    cases.append(("adversarial blocks and exponents", adv, exps))
    return cases


@pytest.mark.parametrize("backend", ["cpu", "metal"])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_mxfp4_never_worse(backend, bits):
    rng = np.random.default_rng([bits, backend == "cpu"])
    for label, packed, codes in _mxfp4_cases(rng):
        for dtype in (BF16, F32):
            x = _decode(packed, codes, dtype)
            if not np.isfinite(x.astype(np.float32)).all():
                assert affine_quantize_mxfp4_mse(packed, codes, 64, bits, dtype=dtype, backend=backend) is None
                continue
            for g in (32, 64, 128):
                out = affine_quantize_mxfp4_mse(packed, codes, g, bits, dtype=dtype, backend=backend)
                assert out is not None, label
                mm = affine_quantize_mxfp4(packed, codes, g, bits, dtype=dtype, backend=backend)
                assert [a.shape for a in out] == [a.shape for a in mm] and [a.dtype for a in out] == [a.dtype for a in mm]
                _assert_never_worse(x, g, bits, backend, out)


def test_mxfp4_float16_is_left_to_the_float_path():
    p = np.zeros((2, 32), dtype=np.uint8)
    assert affine_quantize_mxfp4_mse(p, np.full((2, 2), 120, np.uint8), 64, 4, dtype=F16, backend="cpu") is None


def test_table_minimum_is_exact():
    """The pruned per-pattern tables keep the full table's minimum, and the full table's errors are the
    exact squared errors of the rounded levels (checked with kernels_ref's dequantize at the true scale)."""
    rng = np.random.default_rng(11)
    for backend in ("cpu", "metal"):
        for bits in (3, 4):
            sigma, beta, err_t, codes_t = candidate_table(BF16.name, backend, bits)
            for offs in ((0,), (0, 1), (0, 2, 3)):
                ids, et = pattern_table(BF16.name, backend, bits, offs)
                cols = np.concatenate([np.arange(16) + 16 * d for d in offs])
                counts = rng.integers(0, 5, (300, cols.size)).astype(np.float64)
                counts[rng.random(counts.shape) < 0.5] = 0
                full = counts @ err_t[cols].astype(np.float64)
                pruned = counts @ et.astype(np.float64)
                np.testing.assert_allclose(pruned.min(axis=1), full.min(axis=1), rtol=1e-12)
            # Exactness of the entries: a candidate's error at a true scale 2^e equals 4^e times the table's.
            u = (np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6] * 2) * np.repeat([1, -1], 8)).astype(np.float32)
            for e in (-9, 0, 7):
                k = rng.integers(0, sigma.size, 20)
                s2, b2 = sigma[k] * np.float32(2.0**e), beta[k] * np.float32(2.0**e)
                q = codes_t[k][:, :16].astype(np.float32)
                d = to_float32(dequantize_values(q, s2[:, None], b2[:, None], BF16, backend)).astype(np.float64)
                np.testing.assert_allclose((d - u * 2.0**e) ** 2, err_t[:16, k].T.astype(np.float64) * 4.0**e, rtol=1e-7, atol=0)


@pytest.mark.parametrize("route", ["dense", "mxfp4"])
def test_deterministic_and_independent_of_row_blocks(route):
    rng = np.random.default_rng(3)
    if route == "dense":
        x = rng.standard_normal((64, 1024)).astype(BF16)
        run = lambda a: affine_quantize_mse(a, 64, 4, backend="metal")  # noqa: E731
    else:
        p = rng.integers(0, 256, (64, 512), dtype=np.uint8)
        c = (118 + rng.integers(0, 4, (64, 32))).astype(np.uint8)
        x = (p, c)
        run = lambda a: affine_quantize_mxfp4_mse(a[0], a[1], 64, 4, dtype=BF16, backend="metal")  # noqa: E731
    whole, again = run(x), run(x)
    halves = [run(tuple(a[i:j] for a in x) if route == "mxfp4" else x[i:j]) for i, j in ((0, 24), (24, 64))]
    for k in range(3):
        assert np.array_equal(whole[k], again[k])
        assert np.array_equal(whole[k], np.concatenate([h[k] for h in halves]))


def test_mxfp4_route_equals_float_path_where_it_falls_back():
    """Groups outside the table (offsets > 3) are encoded by the float path on their decoded values."""
    rng = np.random.default_rng(5)
    p = rng.integers(0, 256, (8, 64), dtype=np.uint8)
    c = np.empty((8, 4), dtype=np.uint8)
    c[:, 0::2], c[:, 1::2] = 126, 115  # offset 11 inside every group of 64
    out = affine_quantize_mxfp4_mse(p, c, 64, 4, dtype=BF16, backend="cpu")
    ref = affine_quantize_mse(_decode(p, c), 64, 4, backend="cpu")
    for a, b in zip(out, ref):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Real fixture data, through the pipeline's own routes
# ---------------------------------------------------------------------------------------------


def _encoder_input(conv, ck, t) -> np.ndarray:
    """The rows the encoders see for a planned tensor (decoded, rounded to bfloat16 by the route's rule)."""
    out = []
    for j in iter_jobs(t):
        g = t.target.sources[j.src]
        parts = {r: ck.array(n) for r, n in g.parts.items()}
        out.append(conv._values(t, parts, j.src, (j.start, j.stop), BF16).reshape(-1, g.shape[-1]))
    return np.concatenate(out).astype(np.float32)


@pytest.mark.parametrize("fixture", ["deepseek-v4-tiny", "gpt-oss-tiny", "deepseek-v3-fp8-tiny"])
def test_fixture_groups_never_worse(fixture):
    """Every quantizable weight of the fixture (MXFP4 through the table route, FP8 and bf16 through the float
    path), re-quantized by the pipeline with each encoder: no group of mse worse than MLX's min/max."""
    src = ROOT / "fixtures" / fixture
    plan = build_plan(src, recipe_from_dict({"rules": [{"mode": "keep"}]}), kernel_backend="cpu")
    conv = Converter(plan, src)  # never run: only its per-job encoders are used
    checked = set()
    with Checkpoint(src) as ck:
        for pt in plan.tensors:
            if not (pt.target.quantizable and pt.target.name.endswith(".weight") and pt.shape[-1] % 64 == 0):
                continue
            if pt.target.transform is not None or pt.target.rows is not None:
                continue
            for bits, g in ((4, 64), (3, 32)):
                sse = {}
                for enc in ("minmax", "mse"):
                    t = dataclasses.replace(pt, route=REQUANT, mode="affine", bits=bits, group_size=g, encoder=enc)
                    m = t.target.module
                    parts = [conv.encode_job(ck, job) for job in iter_jobs(t)]
                    out = [np.concatenate([o[f"{m}.{r}"].reshape(-1, o[f"{m}.{r}"].shape[-1]) for o in parts])
                           for r in ("weight", "scales", "biases")]
                    x = _encoder_input(conv, ck, t)
                    sse[enc] = _groups_sse(x, _mlx_dequant(*out, g, bits), g)
                worse = np.flatnonzero(sse["mse"] > sse["minmax"])
                assert worse.size == 0, f"{pt.target.name} {bits}-bit g{g}: {worse.size} groups worse"
                assert sse["mse"].sum() < sse["minmax"].sum()
                checked.add(pt.source_codec)
    assert checked == {"deepseek-v4-tiny": {"mxfp4", "fp8_block", "dense"}, "gpt-oss-tiny": {"mxfp4", "dense"},
                       "deepseek-v3-fp8-tiny": {"fp8_block", "dense"}}[fixture]
