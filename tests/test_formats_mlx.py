"""MLX codecs (affine, mxfp4, mxfp8, nvfp4): decode equals mx.dequantize, encode equals mx.quantize, round trips."""

from __future__ import annotations

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fmtconv.errors import FmtconvError
from fmtconv.formats import SourceGroup, find_groups, get_codec
from fmtconv.formats.safetensors_io import Checkpoint, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_mx(a):
    return mx.array(a.view(np.uint16)).view(mx.bfloat16) if a.dtype == BF16 else mx.array(a)


def to_np(a):
    return np.array(a.view(mx.uint16)).view(BF16) if a.dtype == mx.bfloat16 else np.array(a)


def weights(seed, shape=(8, 128)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(BF16)


@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 64), (5, 32), (6, 128), (8, 64)])
def test_affine_matches_mx(bits, group_size):
    w = weights(bits)
    codec = get_codec("mlx_affine")
    parts = codec.encode(w, bits=bits, group_size=group_size, backend="cpu")
    ref = [to_np(a) for a in mx.quantize(to_mx(w), group_size=group_size, bits=bits, stream=mx.cpu)]
    for role, r in zip(("weight", "scales", "biases"), ref):
        assert parts[role].dtype == r.dtype and parts[role].tobytes() == r.tobytes()
    g = SourceGroup("x.weight", "mlx_affine", {}, w.shape, {"bits": bits, "group_size": group_size})
    exact = codec.decode(parts, g, compute_dtype=BF16)
    deq = to_np(mx.dequantize(*[to_mx(parts[r]) for r in ("weight", "scales", "biases")], group_size=group_size, bits=bits))
    assert np.array_equal(exact.to().view(np.uint16), deq.view(np.uint16))
    # Same scales and biases in, same bytes out (MLX's own scales make every group's decode injective here).
    again = codec.encode(exact, bits=bits, group_size=group_size, scales=parts["scales"], biases=parts["biases"])
    assert again["weight"].tobytes() == parts["weight"].tobytes()
    assert np.array_equal(codec.decode(parts, g, compute_dtype=BF16, rows=(2, 5)).values, exact.values[2:5])


@settings(max_examples=20, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 5, 6]), group_size=st.sampled_from([32, 64, 128]), rows=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_affine_round_trip_hypothesis(bits, group_size, rows, seed):
    codec = get_codec("mlx_affine")
    w = weights(seed, (rows, group_size * 2))
    parts = codec.encode(w, bits=bits, group_size=group_size)
    g = SourceGroup("x.weight", "mlx_affine", {}, w.shape, {"bits": bits, "group_size": group_size})
    exact = codec.decode(parts, g, compute_dtype=BF16)
    again = codec.encode(exact, bits=bits, group_size=group_size, scales=parts["scales"], biases=parts["biases"])
    assert again["weight"].tobytes() == parts["weight"].tobytes()
    # From the values alone (nearest code): also identical for bits <= 6 with MLX's own bfloat16 scales.
    again = codec.encode(exact.values, bits=bits, group_size=group_size, dtype=BF16, scales=parts["scales"], biases=parts["biases"])
    assert again["weight"].tobytes() == parts["weight"].tobytes()


@pytest.mark.parametrize("mode", ["mxfp4", "mxfp8", "nvfp4"])
def test_fp_modes_match_mx(mode):
    w = weights(7, (4, 64))
    codec = get_codec(f"mlx_{mode}")
    parts = codec.encode(w, backend="cpu")
    wq, sc = (np.array(a) for a in mx.quantize(to_mx(w), mode=mode, stream=mx.cpu))
    assert parts["weight"].tobytes() == wq.tobytes() and parts["scales"].tobytes() == sc.tobytes()
    g = SourceGroup("x.weight", codec.name, {}, w.shape, {"mode": mode})
    exact = codec.decode(parts, g, compute_dtype=BF16)
    ref = np.array(mx.dequantize(mx.array(wq), mx.array(sc), mode=mode, dtype=mx.float32))
    assert np.array_equal(exact.values, ref)
    again = codec.encode(exact, scales=parts["scales"])
    assert again["weight"].tobytes() == wq.tobytes() and again["scales"].tobytes() == sc.tobytes()


@settings(max_examples=20, deadline=None)
@given(mode=st.sampled_from(["mxfp4", "mxfp8", "nvfp4"]), rows=st.integers(1, 4), seed=st.integers(0, 2**32 - 1))
def test_fp_modes_round_trip_from_random_bytes(mode, rows, seed):
    rng = np.random.default_rng(seed)
    codec = get_codec(f"mlx_{mode}")
    gsz, bits = {"mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}[mode]
    k = 64
    wq = rng.integers(0, 2**32, size=(rows, k * bits // 32), dtype=np.uint32)
    if bits == 8:  # no E4M3 NaN codes
        b = wq.view(np.uint8)
        b[(b & 0x7F) == 0x7F] = 0x11
    sc = rng.integers(100, 140, size=(rows, k // gsz), dtype=np.uint8) if gsz == 32 else rng.integers(0x20, 0x70, size=(rows, k // gsz), dtype=np.uint8)
    g = SourceGroup("x.weight", codec.name, {}, (rows, k), {"mode": mode})
    exact = codec.decode({"weight": wq, "scales": sc}, g, compute_dtype=BF16)
    again = codec.encode(exact, scales=sc)
    assert again["weight"].tobytes() == wq.tobytes()


def test_mlx_bundle_grouping(tmp_path):
    w = weights(9, (8, 64))
    aff = get_codec("mlx_affine").encode(w, bits=4, group_size=32)
    mxf = get_codec("mlx_mxfp4").encode(w)
    tensors = {
        "model.layers.0.mlp.down_proj.weight": aff["weight"], "model.layers.0.mlp.down_proj.scales": aff["scales"],
        "model.layers.0.mlp.down_proj.biases": aff["biases"],
        "model.layers.0.mlp.up_proj.weight": mxf["weight"], "model.layers.0.mlp.up_proj.scales": mxf["scales"],
        "model.norm.weight": np.ones(64, BF16),
    }
    ckpt = Checkpoint(write_safetensors(tmp_path / "model.safetensors", tensors))
    cfg = {"quantization": {"group_size": 64, "bits": 8, "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 4}}}
    groups = {g.name: g for g in find_groups(ckpt.tensors, cfg)}
    assert groups["model.layers.0.mlp.down_proj.weight"].codec == "mlx_affine"
    assert groups["model.layers.0.mlp.down_proj.weight"].params == {"bits": 4, "group_size": 32}
    assert groups["model.layers.0.mlp.up_proj.weight"].codec == "mlx_mxfp4" and groups["model.layers.0.mlp.up_proj.weight"].shape == (8, 64)
    assert groups["model.norm.weight"].codec == "dense"
    with pytest.raises(FmtconvError, match="no bits/group_size"):
        find_groups(ckpt.tensors, {})
