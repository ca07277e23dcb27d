"""What an allocation chooses between: the units (one module class of one decoder layer, or the embedding, or the head:
the runtime takes one setting per stacked tensor, and the sensitivity is measured per class and layer) and, for each,
the targets its modules can take, with their exact size in bytes from the plan's own part layout."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from fmtconv.convert.naming import module_class
from fmtconv.convert.plan import COMPUTE_DTYPES, Plan, PlannedTensor, parts_for
from fmtconv.convert.recipes import ENCODERS, FP_MODE_PARAMS

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Module classes an allocation leaves alone: a runtime's own converter keeps vision towers dense (as the presets do).
FIXED_CLASSES = ("vision",)


@dataclass(frozen=True, order=True)
class Candidate:
    """One target for a unit's modules: affine (bits, group, encoder), a lossless MLX fp mode, or kept dense."""

    mode: str  # affine | mxfp4 | mxfp8 | keep
    bits: int = 0
    group_size: int = 0
    encoder: str = ""

    @property
    def label(self) -> str:
        if self.mode == "affine":
            return f"affine {self.bits}-bit g{self.group_size} {self.encoder}"
        return self.mode

    def rule(self) -> dict[str, Any]:
        """The recipe rule fields (mode and parameters) that give a module this target."""
        if self.mode == "affine":
            return {"mode": "affine", "bits": self.bits, "group_size": self.group_size, "encoder": self.encoder}
        return {"mode": self.mode}

    def to_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "bits": self.bits, "group_size": self.group_size, "encoder": self.encoder}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Candidate:
        return cls(d["mode"], int(d.get("bits", 0)), int(d.get("group_size", 0)), str(d.get("encoder", "")))


KEEP = Candidate("keep")
REFERENCE = Candidate("affine", 4, 64, "minmax")  # the calibration pass quantizes every unit to this
SAFE = Candidate("affine", 8, 64, "minmax")  # what a unit whose cost could not be measured gets


@dataclass
class Unit:
    """The quantizable modules of one class in one decoder layer (layer None: outside the decoder layers)."""

    layer: int | None
    cls: str
    tensors: list[PlannedTensor] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.cls if self.layer is None else f"layer {self.layer} {self.cls}"

    @property
    def modules(self) -> list[str]:
        return [t.runtime_module for t in self.tensors]  # what recipes match

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    def candidates(self, allowed: tuple[Candidate, ...] | None = None) -> list[Candidate]:
        """Every target all of the unit's modules can take (groups that divide their input dimension; the lossless fp
        modes where every module's source is already in that format)."""
        last = [t.shape[-1] for t in self.tensors]
        out = [Candidate("affine", b, g, e) for b in AFFINE_BITS for g in GROUP_SIZES for e in ENCODERS
               if all(n % g == 0 for n in last)]
        if all(t.source_codec == "mxfp4" and t.target.transform is None for t in self.tensors) and all(n % 32 == 0 for n in last):
            out.append(Candidate("mxfp4", *FP_MODE_PARAMS["mxfp4"]))
        if all(_e8m0_fp8(t) for t in self.tensors) and all(n % 32 == 0 for n in last):
            out.append(Candidate("mxfp8", *FP_MODE_PARAMS["mxfp8"]))
        out.append(KEEP)
        return [c for c in out if allowed is None or c in allowed or c == KEEP]

    def nbytes(self, c: Candidate, dtype: str) -> int:
        """Exact bytes of the unit's tensors at candidate c (the plan's part layout for the compute dtype)."""
        if c.mode == "keep":
            return sum(t.params * COMPUTE_DTYPES[dtype].itemsize for t in self.tensors)
        return sum(p.nbytes for t in self.tensors
                   for p in parts_for(t.target.name, t.target.module, c.mode, c.bits, c.group_size, dtype, t.shape))


def _e8m0_fp8(t: PlannedTensor) -> bool:
    """FP8 with power-of-two (E8M0) block scales: MLX mxfp8 holds it without loss."""
    return t.source_codec == "fp8_block" and all(s.params.get("scale_kind") == "e8m0" for s in t.target.sources)


def layer_of(module: str) -> int | None:
    m = _LAYER.search(module)
    return int(m.group(1)) if m else None


def units_of(keep_plan: Plan) -> tuple[list[Unit], list[PlannedTensor]]:
    """The allocation units of a keep-everything plan, and the tensors no unit holds (their bytes are fixed)."""
    units: dict[tuple[int | None, str], Unit] = {}
    fixed = []
    for t in keep_plan.tensors:
        cls = module_class(t.runtime_module)
        quantizable = t.target.quantizable and t.target.name.endswith(".weight")
        if not quantizable or cls in FIXED_CLASSES or keep_plan.layout.is_multimodal(t.target.name):
            fixed.append(t)
            continue
        key = (layer_of(t.runtime_module), cls)
        units.setdefault(key, Unit(key[0], cls)).tensors.append(t)
    return sorted(units.values(), key=lambda u: (u.layer is not None, u.layer or 0, u.cls)), fixed
