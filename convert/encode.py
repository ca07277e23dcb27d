"""One planned tensor's row blocks, encoded in memory: decode -> round -> the route's encoder.

The pipeline runs these jobs on threads and writes their output into shards; the checks and benchmarks run the
same jobs to measure an encoder without writing a bundle.  Each route's arithmetic is the codecs' and the kernels'
(`fmtconv.formats`, `fmtconv.kernels`, `fmtconv.kernels_ref`); this module only decides which one a job takes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmtconv.convert.plan import CAST, COMPUTE_DTYPES, EXACT_AFFINE, PASSTHROUGH, REPACK, REQUANT, Plan, PlannedTensor
from fmtconv.formats.dense import cast_integers
from fmtconv.formats.dtypes import stored_dtype
from fmtconv.formats.safetensors_io import Checkpoint

# Elements of one row block; a few blocks are in flight per worker (each costs ~10-20 bytes/element).
BLOCK_ELEMENTS = 1 << 22
# The compiled table routes (MXFP4, FP8 codes straight to affine) hold ~2 bytes/element: larger blocks, so fewer
# jobs, read-ahead hints and writes per byte.
TABLE_BLOCK_ELEMENTS = 1 << 24


@dataclass
class Job:
    """Rows [start, stop) of source `src` (flattened to 2-D) of one planned tensor, landing at output row `out_row`."""

    tensor: PlannedTensor
    src: int
    start: int
    stop: int
    out_row: int


def _row_slice(pt: PlannedTensor) -> slice | None:
    return None if pt.target.rows is None else slice(*pt.target.rows)


def iter_jobs(pt: PlannedTensor, block: int | None = None) -> Iterator[Job]:
    """Row blocks of about `block` elements (default BLOCK_ELEMENTS) of every source of a planned tensor, with the
    output row each lands at."""
    block = BLOCK_ELEMENTS if block is None else block
    t = pt.target
    g0 = t.sources[0]
    last = g0.shape[-1]
    sel = _row_slice(pt)
    if t.transform is not None:  # whole-tensor transform: one job per source
        out_per_src = int(np.prod(pt.shape[:-1])) // len(t.sources)
        for k, g in enumerate(t.sources):
            yield Job(pt, k, 0, g.rows, k * out_per_src)
        return
    mat, n_sel = 1, 1  # without a selection every source row is an output row
    if sel is None:
        step_rows = max(128, (block // max(last, 1)) // 128 * 128)
    else:  # blocks of whole matrices along axis -2, so the strided selection stays inside a block
        mat = g0.shape[-2]
        n_sel = len(range(*sel.indices(mat)))
        step_rows = mat * max(1, block // max(mat * last, 1))
    out_per_src = g0.rows // mat * n_sel
    for k, g in enumerate(t.sources):
        for a in range(0, g.rows, step_rows):
            yield Job(pt, k, a, min(g.rows, a + step_rows), k * out_per_src + a // mat * n_sel)


def kernel_key(plan: Plan, pt: PlannedTensor) -> str | None:
    """The compiled kernel (an fmtconv.kernels key) the tensor's jobs call: TensorEncoder._encode takes the table routes
    (MXFP4, FP8 codes) by it, and warm-up compiles by it; None for the routes that run kernels_ref (NumPy) only.  A
    job that falls back to another route (bad values, an unusual layout) compiles that kernel when it first runs."""
    from fmtconv import kernels

    if pt.route != REQUANT or pt.mode != "affine" or pt.encoder == "mse":
        return None
    g = pt.target.sources[0]
    if pt.target.transform is None and g.codec == "mxfp4":
        return kernels.MXFP4
    if pt.target.transform is None and g.codec == "fp8_block" and pt.target.rows is None:
        if g.params.get("scale_kind") == "e8m0":
            return kernels.FP8_E8M0
        if plan.rounding == "mlx-lm":
            return kernels.FP8_FLOAT
    return kernels.dense(COMPUTE_DTYPES[pt.dtype])


def kernel_keys(plan: Plan) -> set[str]:
    """The compiled kernels the plan's jobs call: what a conversion compiles or loads before its workers start."""
    return {k for pt in plan.tensors if (k := kernel_key(plan, pt)) is not None}


def block_elements(plan: Plan, pt: PlannedTensor) -> int:
    """Elements per job: TABLE_BLOCK_ELEMENTS where a compiled table kernel reads the codes (about 2 bytes a
    element in memory: codes, output, scales), BLOCK_ELEMENTS where values are decoded to floats first."""
    from fmtconv import kernels

    table = kernel_key(plan, pt) in kernels.TABLE_ROUTES
    return TABLE_BLOCK_ELEMENTS if table and kernels.compiled() else BLOCK_ELEMENTS


def select_rows(a: np.ndarray, pt: PlannedTensor) -> np.ndarray:
    """The target's axis -2 selection applied to rows of whole source matrices (flattened to 2-D)."""
    sel = _row_slice(pt)
    if sel is None:
        return a
    mat = pt.target.sources[0].shape[-2]
    return a.reshape(-1, mat, a.shape[-1])[:, sel, :].reshape(-1, a.shape[-1])


class TensorEncoder:
    """Encodes a plan's jobs in memory, one codec instance per source format (shared by the pipeline's threads)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._codecs: dict[str, Any] = {}

    def _codec(self, name: str):
        if name not in self._codecs:
            from fmtconv.formats import get_codec

            self._codecs[name] = get_codec(name)
        return self._codecs[name]

    def _values(self, pt: PlannedTensor, parts: dict[str, np.ndarray], k: int, rows: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        """Decoded rows rounded to `dtype` by the route's rounding rule."""
        g = pt.target.sources[k]
        fast = self._codec(g.codec).decode_to(parts, g, dtype=dtype, rows=rows)
        if fast is not None:  # the codec's table route: the same values as decode(...).to(dtype)
            return fast
        exact = self._codec(g.codec).decode(parts, g, compute_dtype=np.dtype(COMPUTE_DTYPES[self.plan.compute_dtype]), rows=rows)
        # FP8 x float32 scale (not exact in float32): round as mlx_lm's sanitize + convert do, so bundles
        # match mlx_lm.convert's; every other source is exact in float32 and is rounded once.
        like_mlx_lm = self.plan.rounding == "mlx-lm" and g.codec == "fp8_block" and exact.values.dtype == np.float64
        return exact.to(dtype, like_mlx_lm=like_mlx_lm)

    def _affine_mse(self, pt: PlannedTensor, parts: dict[str, np.ndarray], job: Job) -> dict[str, np.ndarray]:
        """Affine with the error-minimising encoder: from MXFP4 codes by histogram (kernels_ref.mxfp4_mse) where that
        route applies, else on the rows rounded to the compute dtype (kernels_ref.affine_mse)."""
        from fmtconv.kernels_ref.affine_mse import affine_quantize_mse
        from fmtconv.kernels_ref.mxfp4_mse import affine_quantize_mxfp4_mse

        g = pt.target.sources[job.src]
        dtype = np.dtype(COMPUTE_DTYPES[pt.dtype])
        backend = self.plan.kernel_backend
        out = None
        if g.codec == "mxfp4" and pt.target.transform is None:
            rep = self._codec(g.codec).repack_to_mlx(parts, g, rows=(job.start, job.stop))  # validated bytes, no copy
            packed = select_rows(np.ascontiguousarray(rep["weight"]).view(np.uint8), pt)
            out = affine_quantize_mxfp4_mse(packed, select_rows(np.asarray(rep["scales"]), pt), pt.group_size, pt.bits,
                                            dtype=dtype, backend=backend)
        if out is None:  # as _encode prepares rows for affine_quantize
            v = self._values(pt, parts, job.src, (job.start, job.stop), dtype).reshape(-1, g.shape[-1])
            if pt.target.transform is not None:
                v = pt.target.transform(v.reshape(g.shape))
                v = np.ascontiguousarray(v).reshape(-1, v.shape[-1])
            out = affine_quantize_mse(select_rows(v, pt), pt.group_size, pt.bits, backend=backend)
        module = pt.target.module
        return {f"{module}.weight": out[0], f"{module}.scales": out[1], f"{module}.biases": out[2]}

    def encode_job(self, ck: Checkpoint, job: Job) -> dict[str, np.ndarray]:
        """One job's output arrays in memory, nothing written (verify --compare-encoders, bench encoders)."""
        g = job.tensor.target.sources[job.src]
        parts = {role: ck.array(name) for role, name in g.parts.items()}
        try:
            return self._encode(job.tensor, parts, job)
        finally:
            del parts
            for name in g.parts.values():
                ck.release(name)

    def encode_tensor(self, ck: Checkpoint, pt: PlannedTensor) -> dict[str, np.ndarray]:
        """Every output part of one planned tensor, whole, in memory (its jobs assembled row block by row block):
        what the pipeline would write for it, for the checks that run a model on a layer's weights."""
        out = {spec.name: np.empty(spec.shape, dtype=stored_dtype(spec.dtype).numpy) for spec in pt.parts}
        for job in iter_jobs(pt):
            for name, rows in self.encode_job(ck, job).items():
                flat = out[name].reshape(-1, out[name].shape[-1]) if out[name].ndim > 1 else out[name].reshape(1, -1)
                flat[job.out_row : job.out_row + rows.shape[0]] = rows.reshape(-1, flat.shape[-1])
        return out

    def _encode(self, pt: PlannedTensor, parts: dict[str, np.ndarray], job: Job) -> dict[str, np.ndarray]:
        """Output part arrays (by output tensor name) for one job's rows."""
        from fmtconv import kernels, kernels_ref

        g = pt.target.sources[job.src]
        rows = (job.start, job.stop)
        last = g.shape[-1]
        module = pt.target.module
        if pt.route == PASSTHROUGH:
            raw = np.asarray(parts["weight"]).reshape(-1, last)[job.start : job.stop]
            return {pt.target.name: select_rows(raw, pt)}
        if pt.mode == "dense" and pt.dtype not in COMPUTE_DTYPES:  # integers the runtime holds in another dtype
            raw = np.asarray(parts["weight"]).reshape(-1, last)[job.start : job.stop]
            return {pt.target.name: cast_integers(select_rows(raw, pt), np.dtype(pt.dtype), name=g.name)}
        if pt.route == REPACK:
            rep = self._codec(g.codec).repack_to_mlx(parts, g, rows=rows)
            return {f"{module}.weight": select_rows(rep["weight"], pt), f"{module}.scales": select_rows(rep["scales"], pt)}
        if pt.route == EXACT_AFFINE:
            rep = self._codec(g.codec).to_affine5(parts, g, compute_dtype=np.dtype(COMPUTE_DTYPES[pt.dtype]), rows=rows)
            return {f"{module}.{r}": select_rows(rep[r], pt) for r in ("weight", "scales", "biases")}
        if pt.route == REQUANT and pt.mode == "affine" and pt.encoder == "mse":
            return self._affine_mse(pt, parts, job)
        dtype = np.dtype(COMPUTE_DTYPES[pt.dtype])
        key = kernel_key(self.plan, pt)  # the one place that says which table route a tensor takes
        if key in kernels.TABLE_ROUTES:
            fast = (self._affine_from_mxfp4 if key == kernels.MXFP4 else self._affine_from_fp8)(pt, parts, job, dtype)
            if fast is not None:
                return fast
        v = self._values(pt, parts, job.src, rows, dtype).reshape(-1, last)
        if pt.target.transform is not None:
            v = pt.target.transform(v.reshape(g.shape))
            v = np.ascontiguousarray(v).reshape(-1, v.shape[-1])
        v = select_rows(v, pt)
        if pt.route == CAST:
            return {pt.target.name: v}
        assert pt.route == REQUANT
        if pt.mode == "affine":
            wq, s, b = kernels.affine_quantize(v, pt.group_size, pt.bits, backend=self.plan.kernel_backend)
            return {f"{module}.weight": wq, f"{module}.scales": s, f"{module}.biases": b}
        wq, s = kernels_ref.fp_quantize(v, pt.mode)[:2]
        return {f"{module}.weight": wq, f"{module}.scales": s}

    def _affine_from_mxfp4(self, pt: PlannedTensor, parts: dict[str, np.ndarray], job: Job, dtype: np.dtype) -> dict[str, np.ndarray] | None:
        """MXFP4 rows -> affine straight from the codes (kernels.affine_quantize_mxfp4: the same bytes as
        decode + round + affine_quantize, several times faster); None where that table route does not apply."""
        from fmtconv.kernels import affine_quantize_mxfp4

        g = pt.target.sources[job.src]
        rep = self._codec(g.codec).repack_to_mlx(parts, g, rows=(job.start, job.stop))  # validated bytes, no copy
        packed = select_rows(np.ascontiguousarray(rep["weight"]).view(np.uint8), pt)
        codes = select_rows(np.asarray(rep["scales"]), pt)
        out = affine_quantize_mxfp4(packed, codes, pt.group_size, pt.bits, dtype=dtype, backend=self.plan.kernel_backend)
        if out is None:
            return None
        module = pt.target.module
        return {f"{module}.weight": out[0], f"{module}.scales": out[1], f"{module}.biases": out[2]}

    def _affine_from_fp8(self, pt: PlannedTensor, parts: dict[str, np.ndarray], job: Job, dtype: np.dtype) -> dict[str, np.ndarray] | None:
        """FP8 rows -> affine straight from codes and block scales (kernels.affine_quantize_fp8: the values the NumPy
        route rounds, quantized as it does); None where it does not apply (then that route runs, and refuses bad input)."""
        from fmtconv.kernels import affine_quantize_fp8

        g = pt.target.sources[job.src]
        f = self._codec(g.codec).factored_rows(parts, g, rows=(job.start, job.stop))
        if f is None:
            return None
        out = affine_quantize_fp8(f.codes, f.scale, f.srows, f.block_cols, scale_kind=f.scale_kind, group_size=pt.group_size,
                                  bits=pt.bits, dtype=dtype, backend=self.plan.kernel_backend)
        if out is None:
            return None
        module = pt.target.module
        return {f"{module}.weight": out[0], f"{module}.scales": out[1], f"{module}.biases": out[2]}
