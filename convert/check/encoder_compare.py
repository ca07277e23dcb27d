"""Both affine encoders side by side on a bundle's source: SQNR per module pattern for `minmax` and `mse`.

Every affine module of the bundle is re-encoded from the source, at its own bits and group size, through
the pipeline's own routes (`TensorEncoder.encode_job`: the MXFP4 table routes, the float path with the same
rounding), once per encoder; both results are dequantized with kernels_ref (MLX's CPU arithmetic, as
verify's SQNR) and compared with the source's exact values.  Nothing is written.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fmtconv.convert.bundle.reader import open_bundle
from fmtconv.convert.check.source_values import mapping_plan, source_rows
from fmtconv.convert.check.weight_quality import ErrorStats, OutputReader, json_float
from fmtconv.convert.encode import TensorEncoder, iter_jobs
from fmtconv.convert.naming import module_pattern, natural_key
from fmtconv.convert.plan import REQUANT, Plan, PlannedTensor
from fmtconv.convert.recipes import ENCODERS
from fmtconv.formats.safetensors_io import Checkpoint


def encode_and_measure(conv: TensorEncoder, ck: Checkpoint, pt: PlannedTensor, bits: int, group_size: int,
                       encoders: Iterable[str] = ENCODERS) -> dict[str, ErrorStats]:
    """Error statistics of one planned tensor re-quantized to affine (bits, group_size) by each encoder."""
    from fmtconv.kernels_ref import affine_dequantize

    ref = source_rows(ck, pt)
    module = pt.target.module
    stats = {}
    for enc in encoders:
        target = dataclasses.replace(pt, route=REQUANT, mode="affine", bits=bits, group_size=group_size, encoder=enc)
        st = ErrorStats()
        for job in iter_jobs(target):
            out = conv.encode_job(ck, job)
            deq = affine_dequantize(out[f"{module}.weight"], out[f"{module}.scales"], out[f"{module}.biases"], group_size, bits,
                                    backend="cpu", name=module)
            st.update(ref(job.out_row, job.out_row + deq.shape[0]), deq)
        stats[enc] = st
    return stats


@dataclasses.dataclass
class _Pooled:
    """Signal and noise of several tensors pooled: the pattern's SQNR over all its elements."""

    signal: float = 0.0
    noise: float = 0.0
    count: int = 0
    numel: int = 0

    def add(self, s: ErrorStats) -> None:
        self.signal += s.signal
        self.noise += s.noise
        self.numel += s.count

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


def compare_encoders(out_dir: str | Path, src: str | Path) -> list[dict[str, Any]]:
    """Per module pattern (and bits, group size) of the bundle's affine modules: SQNR in dB with each encoder,
    the gain of mse over minmax, and the encoder that wrote the bundle (from its config's `fmtconv` record)."""
    b = open_bundle(out_dir)
    try:
        reader = OutputReader(b)
        prov = (b.config or {}).get("fmtconv") or {}
    finally:
        b.close()
    mp: Plan = mapping_plan(out_dir, src)
    mp = dataclasses.replace(mp, kernel_backend=prov.get("kernel_backend", "metal"), rounding=prov.get("rounding", "mlx-lm"))
    written = prov.get("encoders") or {}
    groups: dict[tuple[str, int, int], dict[str, _Pooled]] = {}
    with Checkpoint(src) as ck:
        conv = TensorEncoder(mp)
        for pt in mp.tensors:
            m = reader.module_of(pt.target.name)
            if m is None or m[1].mode != "affine":
                continue
            q = m[1]
            key = (module_pattern(m[0]), q.bits, q.group_size)
            pooled = groups.setdefault(key, {enc: _Pooled() for enc in ENCODERS})
            for enc, st in encode_and_measure(conv, ck, pt, q.bits, q.group_size).items():
                pooled[enc].add(st)
                pooled[enc].count += 1
    rows = []
    for (pattern, bits, gs), pooled in sorted(groups.items(), key=lambda kv: natural_key(kv[0][0])):
        mm, mse = pooled["minmax"].sqnr_db, pooled["mse"].sqnr_db
        rows.append({"pattern": pattern, "bits": bits, "group_size": gs, "count": pooled["minmax"].count,
                     "numel": pooled["minmax"].numel, "minmax_db": json_float(mm), "mse_db": json_float(mse),
                     "gain_db": json_float(mse - mm) if math.isfinite(mse - mm) else None,
                     "written_with": written.get(pattern, prov.get("encoder", "minmax") if prov else None)})
    return rows


def encoder_table_text(rows: list[dict[str, Any]]) -> list[str]:
    """The comparison as text lines (verify's report)."""
    lines = [f"  {'pattern':60s} {'bits':>4s} {'group':>5s} {'n':>4s} {'minmax dB':>10s} {'mse dB':>8s} {'gain':>6s}  written with"]
    for r in rows:
        gain = f"{r['gain_db']:+6.2f}" if isinstance(r["gain_db"], float) else f"{'-':>6s}"
        lines.append(f"  {r['pattern']:60s} {r['bits']:4d} {r['group_size']:5d} {r['count']:4d} {_db(r['minmax_db']):>10s} "
                     f"{_db(r['mse_db']):>8s} {gain}  {r['written_with']}")
    return lines


def _db(x: Any) -> str:
    return x if isinstance(x, str) else f"{x:.2f}"


__all__ = ["compare_encoders", "encode_and_measure", "encoder_table_text"]
