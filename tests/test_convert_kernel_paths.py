"""A conversion writes the same bytes whichever kernels run: compiled (fmtconv.kernels) or the NumPy references.

FMTCONV_KERNELS=compiled / reference force either (the default, auto, takes the references for conversions
as small as these, so that numba's start is not paid for them); each case below converts with both and
compares every shard and the index byte for byte, and checks the compiled routes did run.  The cases
cover MXFP4 -> affine (DeepSeek-V4, gpt-oss with its gate/up selection), FP8 with E8M0 and float32
scales (both roundings), dense bfloat16 -> affine, and the three compute dtypes and two arithmetics.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import fmtconv.kernels as kernels
from fmtconv.convert import convert, plan
from fmtconv.convert.encode import kernel_keys
from fmtconv.kernels import routes
from fmtconv.kernels._jit import numba_available

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "fixtures"

pytestmark = pytest.mark.skipif(not numba_available(), reason="numba is not installed")


def _bundle(out: Path) -> dict[str, bytes]:
    """Weights and index (config.json and the model card name the output directory)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith((".safetensors", ".index.json"))}


def _synthetic(tmp_path: Path) -> Path:
    from fmtconv.convert.bench.data import generate_checkpoint

    return generate_checkpoint(tmp_path / "synth", 0, quiet=True, hidden=256, moe_inter=128, experts=4, vocab=256, layers=2)


CASES = [
    ("deepseek-v4-tiny", "q4q8", "metal", None, "mlx-lm"),
    ("deepseek-v4-tiny", "mixed_3_6", "cpu", "float16", "mlx-lm"),
    ("synthetic-v4", "q4q8", "cpu", None, "mlx-lm"),
    ("synthetic-v4", "q8_5", "metal", "float32", "mlx-lm"),
    ("deepseek-v3-fp8-tiny", "q4q8", "cpu", None, "mlx-lm"),
    ("deepseek-v3-fp8-tiny", "mixed_2_6", "metal", "float16", "mlx-lm"),
    ("deepseek-v3-fp8-tiny", "q4q8", "cpu", None, "exact"),
    ("gpt-oss-tiny", "q4q8", "metal", None, "mlx-lm"),
]


@pytest.mark.parametrize("name,recipe,backend,dtype,rounding", CASES)
def test_bytes_do_not_depend_on_the_kernels(tmp_path: Path, monkeypatch, name, recipe, backend, dtype, rounding) -> None:
    src = _synthetic(tmp_path) if name == "synthetic-v4" else FIX / name
    kw = {"recipe": recipe, "kernel_backend": backend, "compute_dtype": dtype, "rounding": rounding, "workers": 2}
    calls = {"compiled": 0}
    used: set[str] = set()  # the kernels the jobs called: all of them named by kernel_keys (compiled before the jobs)
    real_mxfp4, real_fp8, real_affine = routes.affine_quantize_mxfp4, routes.affine_quantize_fp8, routes.affine_quantize

    def counting(fn, key_of):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            calls["compiled"] += out is not None and kernels.compiled()
            used.add(key_of(*a, **k))
            return out
        return wrapped

    with monkeypatch.context() as m:
        m.setenv(kernels.KERNELS_ENV, "compiled")
        for mod in (kernels, routes):
            m.setattr(mod, "affine_quantize_mxfp4", counting(real_mxfp4, lambda *a, **k: kernels.MXFP4))
            m.setattr(mod, "affine_quantize_fp8", counting(real_fp8, lambda *a, scale_kind, **k:
                                                          kernels.FP8_E8M0 if scale_kind == "e8m0" else kernels.FP8_FLOAT))
            m.setattr(mod, "affine_quantize", counting(real_affine, lambda w, *a, **k: kernels.dense(w.dtype)))
        convert(src, tmp_path / "compiled", **kw)
    assert calls["compiled"] > 0
    assert used <= kernel_keys(plan(src, **{k: v for k, v in kw.items() if k != "workers"}))
    with monkeypatch.context() as m:
        m.setenv(kernels.KERNELS_ENV, "reference")
        convert(src, tmp_path / "reference", **kw)
    assert _bundle(tmp_path / "compiled") == _bundle(tmp_path / "reference")


def test_auto_takes_the_references_for_small_conversions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(kernels.KERNELS_ENV, raising=False)
    used = []
    real = routes.affine_quantize_mxfp4
    monkeypatch.setattr(kernels, "affine_quantize_mxfp4", lambda *a, **k: (used.append(kernels.compiled()), real(*a, **k))[1])
    try:
        convert(FIX / "deepseek-v4-tiny", tmp_path / "out", recipe="q4q8")
    finally:
        kernels.auto_for(kernels.AUTO_MIN_PARAMS)  # leave "auto" as a fresh process has it
    assert used and not any(used)
