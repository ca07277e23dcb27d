"""Rounding to the compute dtype (single nearest-even vs mlx_lm's float32 path) and the dense codec."""

from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmtconv.errors import FmtconvError
from fmtconv.formats import SourceGroup, get_codec
from fmtconv.formats.rounding import round_like_mlx_lm, round_to_dtype, to_float32_odd

BF16 = np.dtype(ml_dtypes.bfloat16)


def nearest_even_bf16(x: float) -> int:
    """Reference: the bfloat16 bits nearest to x by exact rational distance, ties to the even significand."""
    b = int(np.array([x]).astype(np.float32).astype(BF16).view(np.uint16)[0])
    cands = {b, (b + 1) & 0xFFFF, (b - 1) & 0xFFFF}
    best = None
    for c in cands:
        v = float(np.array([c], np.uint16).view(BF16).astype(np.float64)[0])
        if not np.isfinite(v):
            continue
        key = (abs(Fraction(v) - Fraction(x)), c & 1)
        if best is None or key < best[0]:
            best = (key, c)
    return best[1]


def nearest_even_f16(x: float) -> float:
    """Reference: the float16 nearest to x by exact rational distance, ties to the even significand."""
    c = np.float16(np.float32(x))
    cands = [c, np.nextafter(c, np.float16(np.inf)), np.nextafter(c, np.float16(-np.inf))]
    return float(min(cands, key=lambda v: (abs(Fraction(float(v)) - Fraction(x)), int(np.array([v]).view(np.uint16)[0]) & 1)))


# Float64 values just off a bfloat16/float16 midpoint, where rounding via float32 first lands on
# the midpoint and then goes to even: the double-rounding trap.
NEAR_MIDPOINTS = [1 + 2**-8 + 2**-30, 1 + 2**-8 - 2**-30, -(3 + 2**-7 + 2**-35), 1 + 3 * 2**-8 - 2**-31, 2**-130 * (1 + 2**-8 + 2**-40)]


def test_round_to_bfloat16_is_exact_under_either_float64_cast():
    """ml_dtypes < 0.7 cast float64 -> bfloat16 via float32 (two roundings), 0.7 rounds once.  fmtconv's
    round-to-odd float32 step gives the exactly nearest bfloat16 under both behaviours."""
    x = np.array(NEAR_MIDPOINTS)
    want = [nearest_even_bf16(v) for v in x]
    assert round_to_dtype(x, BF16).view(np.uint16).tolist() == want
    odd = to_float32_odd(x)
    via_float32 = odd.astype(np.float32).astype(BF16)  # the old two-step cast, applied to the odd float32
    single = [nearest_even_bf16(float(v)) for v in odd]  # a single rounding of the odd float32
    assert via_float32.view(np.uint16).tolist() == want and single == want
    assert [nearest_even_bf16(float(np.float32(v))) for v in x] != want  # rounding via plain float32 would be wrong


def test_round_to_float16_and_the_mlx_lm_path():
    assert round_to_dtype(np.array([1 + 2**-11 + 2**-40]), np.float16)[0] == np.float16(1 + 2**-10)
    x = np.array(NEAR_MIDPOINTS[:4])
    assert [float(v) for v in round_to_dtype(x, np.float16)] == [nearest_even_f16(v) for v in x]
    # mlx_lm's path rounds to float32 first, on purpose: 1 + 2^-8 + 2^-30 -> 1 + 2^-8 -> 1.0 in bfloat16.
    assert round_like_mlx_lm(np.array([1 + 2**-8 + 2**-30]), BF16).astype(np.float64)[0] == 1.0


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1e30, max_value=1e30, allow_nan=False, allow_infinity=False) | st.floats(min_value=-1e-38, max_value=1e-38))
def test_round_to_bfloat16_is_one_nearest_even_rounding(x):
    got = int(round_to_dtype(np.array([x]), BF16).view(np.uint16)[0])
    want = nearest_even_bf16(x)
    assert got == want or (got & 0x7FFF) == (want & 0x7FFF) == 0


def test_dense_decode_encode():
    codec = get_codec("dense")
    w = np.random.default_rng(0).standard_normal((6, 10)).astype(BF16)
    g = SourceGroup("m.weight", "dense", {"weight": "m.weight"}, (6, 10), {"dtype": "BF16"})
    exact = codec.decode({"weight": w}, g, compute_dtype=BF16)
    assert exact.values.dtype == np.float32 and codec.encode(exact)["weight"].tobytes() == w.tobytes()
    assert np.array_equal(codec.decode({"weight": w}, g, compute_dtype=BF16, rows=(1, 3)).values, exact.values[1:3])
    assert codec.encode(exact, dtype="F16")["weight"].dtype == np.float16
    with pytest.raises(FmtconvError, match="not a float"):
        codec.decode({"weight": np.zeros(3, np.int32)}, SourceGroup("ids", "dense", {}, (3,), {"dtype": "I32"}), compute_dtype=BF16)
    with pytest.raises(FmtconvError, match="rows"):
        codec.decode({"weight": w}, g, compute_dtype=BF16, rows=(4, 9))


def test_mlx_lm_path_goes_through_bfloat16_for_every_model_dtype():
    # mlx_lm's FP8 dequant casts to bfloat16, then mlx_lm.convert casts to the model dtype:
    # 1 + 2^-9 survives in float16 directly but not via bfloat16.
    x = np.array([1 + 2**-9])
    assert round_like_mlx_lm(x, np.float16)[0] == np.float16(1.0)
    assert round_to_dtype(x, np.float16)[0] == np.float16(1 + 2**-9)
