"""Read a plan's output tensors back from the source as float32 rows, for verify's SQNR report.

The row mapping (stacked sources, axis -2 row selections, whole-tensor transforms) is the same
one the pipeline writes with (`encode.iter_jobs`); values are the source's exact decode,
before any rounding to the compute dtype, so the SQNR includes that rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from fmtconv.convert.encode import select_rows
from fmtconv.convert.layouts import drafter_layout_named
from fmtconv.convert.plan import COMPUTE_DTYPES, Plan, PlannedTensor, build_plan, read_config
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.formats import get_codec
from fmtconv.formats.safetensors_io import Checkpoint

SourceRows = Callable[[int, int], np.ndarray]


def _decode(ck: Checkpoint, pt: PlannedTensor, k: int, a: int, b: int) -> np.ndarray:
    g = pt.target.sources[k]
    parts = {role: ck.array(name) for role, name in g.parts.items()}
    dtype = np.dtype(COMPUTE_DTYPES[pt.dtype]) if pt.dtype in COMPUTE_DTYPES else np.dtype(np.float32)
    exact = get_codec(g.codec).decode(parts, g, compute_dtype=dtype, rows=(a, b))
    return np.asarray(exact.values, dtype=np.float32).reshape(b - a, g.shape[-1])


def source_rows(ck: Checkpoint, pt: PlannedTensor) -> SourceRows:
    """fn(start, stop) -> float32 rows [start, stop) of the output tensor, flattened to 2-D, from the source."""
    t = pt.target
    n_src = len(t.sources)
    out_rows = int(np.prod(pt.shape[:-1])) if len(pt.shape) > 1 else 1
    per_src = out_rows // n_src
    sel = None if t.rows is None else slice(*t.rows)

    def one_source(k: int, la: int, lb: int) -> np.ndarray:
        g = t.sources[k]
        if t.transform is not None:
            v = t.transform(_decode(ck, pt, k, 0, g.rows).reshape(g.shape))
            return np.ascontiguousarray(v, dtype=np.float32).reshape(-1, v.shape[-1])[la:lb]
        if sel is None:
            return _decode(ck, pt, k, la, lb)
        mat = g.shape[-2]
        n_sel = len(range(*sel.indices(mat)))
        j0, j1 = la // n_sel, (lb - 1) // n_sel + 1
        return select_rows(_decode(ck, pt, k, j0 * mat, j1 * mat), pt)[la - j0 * n_sel : lb - j0 * n_sel]

    def fn(start: int, stop: int) -> np.ndarray:
        pieces = []
        for k in range(start // per_src, (stop - 1) // per_src + 1):
            la, lb = max(start, k * per_src) - k * per_src, min(stop, (k + 1) * per_src) - k * per_src
            pieces.append(one_source(k, la, lb))
            for name in t.sources[k].parts.values():
                ck.release(name)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    return fn


def mapping_plan(out_dir: str | Path, src: str | Path) -> Plan:
    """The source -> output mapping of a bundle: a keep-everything plan with the bundle's layout and dtype."""
    config = read_config(Path(out_dir))
    prov = config.get("fmtconv") or {}
    dtype = next((config[k] for k in ("torch_dtype", "dtype") if isinstance(config.get(k), str) and config[k] in COMPUTE_DTYPES), None)
    keep_all = recipe_from_dict({"name": "mapping", "rules": [{"mode": "keep"}]})
    if drafter_layout_named(prov.get("layout")) is not None:  # a drafter bundle (`--mtp`): the source's MTP layer
        return build_plan(src, keep_all, compute_dtype=dtype, mtp=True).drafter
    return build_plan(src, keep_all, compute_dtype=dtype, family=prov.get("layout"), runtime=prov.get("runtime"))


def source_pairs(out_dir: str | Path, src: str | Path, ck: Checkpoint) -> Iterator[tuple[str, SourceRows]]:
    """(output tensor name, source rows) for every float output tensor of the bundle that the source maps to (integer
    tables, e.g. DeepSeek-V4's tid2eid, are copied exactly or narrowed where every value fits: nothing to measure)."""
    for pt in mapping_plan(out_dir, src).tensors:
        if pt.mode == "dense" and pt.dtype not in COMPUTE_DTYPES:
            continue
        yield pt.target.name, source_rows(ck, pt)
