"""`--fit SIZE` / `--target-bpw X`: the recipe that gives the least predicted KL within a byte budget.

Units and candidates (fit.candidates), measured costs (fit.sensitivity, cached), one choice per unit (fit.solve), and the
choice written back as an ordinary, editable recipe: the constraint recipe's rules first (they pin what they match),
then one rule per module class and candidate with the layers that take it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtconv.convert.check.eval.tokens import TokenBatch
from fmtconv.convert.fit import sensitivity as sens
from fmtconv.convert.fit.candidates import KEEP, Candidate, Unit, units_of
from fmtconv.convert.fit.solve import Option, smallest, solve
from fmtconv.convert.naming import MODULE_CLASSES
from fmtconv.convert.plan import build_plan, num_layers_of
from fmtconv.convert.recipes import Recipe, recipe_from_dict
from fmtconv.convert.units import human_bytes
from fmtconv.errors import FmtconvError

FIT_RECIPE_FILE = "fit-recipe.toml"  # in the bundle: the allocation, reproducible with --recipe
# After the fitted rules: what a --mtp drafter's modules get (no allocation unit holds them; the main model's modules
# are all matched earlier): q4q8's rules.
DRAFTER_TAIL: list[dict[str, Any]] = [
    {"match": r"(?:switch_mlp|\.mlp\.experts)\.", "mode": "affine", "bits": 4, "on_indivisible": "keep", "note": "drafter"},
    {"mode": "affine", "bits": 8, "on_indivisible": "keep", "note": "drafter"},
]
_CLASS_PATTERN = dict(MODULE_CLASSES)
_LAYERS_PATH = re.compile(r"^(.*?\blayers)\.\d+\.")


@dataclass
class FitResult:
    recipe: Recipe
    budget: int
    fixed_bytes: int
    predicted_kl: float
    choice: dict[str, Candidate]
    unit_bytes: dict[str, int]
    cache: str | None
    measured: bool  # False: the costs came from the cache
    reference: dict[str, float] = field(default_factory=dict)  # every unit at the reference: measured and predicted KL
    unmeasured: list[str] = field(default_factory=list)  # units kept at affine 8-bit: the forward never calls them as modules

    @property
    def planned_bytes(self) -> int:
        return self.fixed_bytes + sum(self.unit_bytes.values())

    def to_json(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "planned_bytes": self.planned_bytes, "predicted_kl": self.predicted_kl,
                "choice": {u: c.label for u, c in self.choice.items()}, "sensitivity_cache": self.cache,
                "measured": self.measured, "reference_check": self.reference, "unmeasured": self.unmeasured,
                "recipe": self.recipe.model_dump(mode="json")}

    def toml(self) -> str:
        return recipe_toml(self.recipe, [f"fmtconv --fit: budget {self.budget} bytes ({human_bytes(self.budget)}), planned "
                                         f"{self.planned_bytes} bytes, predicted KL {self.predicted_kl:.5f} nats/token"])


def fit_recipe(source: str | Path, budget: int, *, tokens: TokenBatch, constraints: Recipe | None = None,
               compute_dtype: str | None = None, kernel_backend: str = "metal", rounding: str = "mlx-lm",
               family: str | None = None, runtime: str | None = None, cache_dir: str | Path | None = None,
               candidates: tuple[Candidate, ...] | None = None, extra_bytes: int = 0, progress: sens.Progress | None = None
               ) -> FitResult:
    """The allocation of `source` to `budget` bytes of weight shards (less `extra_bytes` spent elsewhere, e.g. a drafter).

    `candidates` restricts the affine/fp candidates tried (default: all; kept dense is always a candidate)."""
    source = Path(source)
    settings = {"compute_dtype": compute_dtype, "kernel_backend": kernel_backend, "rounding": rounding}
    keep_plan = build_plan(source, recipe_from_dict({"name": "keep", "rules": [{"mode": "keep"}]}), family=family,
                           runtime=runtime, **settings)
    dtype = keep_plan.compute_dtype
    n_layers = num_layers_of(keep_plan.config)
    all_units, _ = units_of(keep_plan)
    units: list[Unit] = []
    for u in all_units:
        free = [t for t in u.tensors if constraints is None or constraints.target_for(
            t.runtime_module, t.source_codec, quantizable=True, num_layers=n_layers,
            multimodal=keep_plan.layout.is_multimodal(t.target.name)) is None]
        if free:
            units.append(Unit(u.layer, u.cls, free))
    base = build_plan(source, _with_keep(constraints), family=family, runtime=runtime, **settings)
    free_names = {t.target.name for u in units for t in u.tensors}
    fixed = sum(t.nbytes for t in base.tensors if t.target.name not in free_names) + extra_bytes
    cands = {u.key: u.candidates(candidates) for u in units}
    options_bytes = {u.key: {c: u.nbytes(c, dtype) for c in cands[u.key]} for u in units}
    least = fixed + sum(min(b.values()) for b in options_bytes.values())
    if least > budget:
        if constraints is not None and fixed > budget:
            raise FmtconvError(f"the recipe {constraints.name!r} alone takes {fixed} bytes ({human_bytes(fixed)}) for the "
                               f"modules it pins and the tensors no unit holds, over the budget of {budget} bytes "
                               f"({human_bytes(budget)})")
        raise FmtconvError(f"the budget of {budget} bytes ({human_bytes(budget)}) is below the smallest bundle fmtconv can "
                           f"plan for this source: {least} bytes ({human_bytes(least)})", file=source)
    key_units = {u.key: [t.target.name for t in u.tensors] for u in units}
    key = sens.cache_key(keep_plan, tokens, cands, {**settings, "units": key_units})
    dirs = sens.cache_dirs(source, Path(cache_dir) if cache_dir else None)
    table = sens.load_cached(dirs, key)
    measured = table is None
    where = None
    if table is None:
        table = sens.measure(source, keep_plan, units, cands, tokens, settings, progress)
        saved = sens.save_cached(dirs, key, table)
        where = str(saved) if saved else None
    else:
        where = next((str(d / f"sensitivity-{key}.json") for d in dirs if (d / f"sensitivity-{key}.json").exists()), None)
    # A unit the measurement could not reach (a head the runtime applies as a plain matmul) has one option: SAFE.
    options = {u.key: [Option(c, options_bytes[u.key][c], table.kl(u.key, c)) for c in cands[u.key] if c in table.costs[u.key]]
               for u in units}
    if smallest(options) + fixed > budget:
        least = smallest(options) + fixed
        raise FmtconvError(f"the budget of {budget} bytes ({human_bytes(budget)}) is below the smallest bundle fmtconv can "
                           f"plan for this source with measured costs: {least} bytes ({human_bytes(least)}; "
                           f"unmeasured units kept at 8 bits: {', '.join(table.meta.get('unmeasured', []))})", file=source)
    chosen = solve(options, budget - fixed)
    choice = {u: o.choice for u, o in chosen.items()}
    recipe = fitted_recipe(units, choice, constraints, budget)
    return FitResult(recipe, budget, fixed, table.predicted_kl(choice), choice, {u: o.nbytes for u, o in chosen.items()},
                     where, measured, {"measured_kl": table.kl_reference, "predicted_kl": table.predicted_reference},
                     table.meta.get("unmeasured", []))


def _with_keep(constraints: Recipe | None) -> Recipe:
    rules = [r.model_dump(mode="json", exclude_none=True) for r in constraints.rules] if constraints else []
    return recipe_from_dict({"name": "fit base", "rules": rules + [{"mode": "keep"}]})


def _layers_expr(layers: list[int]) -> str:
    """A `layers` expression selecting exactly these indices (runs of consecutive layers as ranges)."""
    runs: list[list[int]] = []
    for i in sorted(layers):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return " or ".join(f"i == {a}" if a == b else f"{a} <= i and i <= {b}" for a, b in runs)


def fitted_recipe(units: list[Unit], choice: dict[str, Candidate], constraints: Recipe | None, budget: int) -> Recipe:
    """Constraint rules, then exact rules for the units outside the decoder layers, then per module class (in the order
    that classifies a module) one rule per candidate with the layers that take it."""
    rules = [r.model_dump(mode="json", exclude_none=True) for r in constraints.rules] if constraints else []
    by_class: dict[tuple[str, str], dict[Candidate, list[int]]] = defaultdict(lambda: defaultdict(list))
    for u in units:
        c = choice[u.key]
        if u.layer is None:
            pattern = "^(?:" + "|".join(re.escape(m) for m in u.modules) + ")$"
            rules.append({"match": pattern, **_rule(c), "note": f"fit: {u.key}"})
            continue
        m = _LAYERS_PATH.match(u.modules[0])
        prefix = m.group(1) if m else "layers"
        by_class[(prefix, u.cls)][c].append(u.layer)
    order = [name for name, _ in MODULE_CLASSES] + ["other"]
    for (prefix, cls), per in sorted(by_class.items(), key=lambda kv: (order.index(kv[0][1]), kv[0][0])):
        cls_pattern = _CLASS_PATTERN.get(cls, "")
        cls_re = cls_pattern.pattern if cls_pattern else "."
        for c, layers in sorted(per.items(), key=lambda kv: min(kv[1])):
            rules.append({"match": f"^(?={re.escape(prefix)}\\.\\d+\\.).*{cls_re}", "layers": _layers_expr(layers), **_rule(c),
                          "note": f"fit: {cls}"})
    return recipe_from_dict({"name": f"fit-{budget}", "description": f"fmtconv --fit to {budget} bytes", "rules": rules})


def _rule(c: Candidate) -> dict[str, Any]:
    return {"mode": "keep"} if c == KEEP else c.rule()


def recipe_toml(recipe: Recipe, comments: list[str] = ()) -> str:
    """TOML text that `load_recipe` reads back into the same recipe (strings as TOML literal strings: no escapes)."""
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        s = str(v)
        return f"'{s}'" if "'" not in s and "\n" not in s else '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = [f"# {c}" for c in comments]
    lines += [f"name = {value(recipe.name)}", f"description = {value(recipe.description)}", ""]
    for r in recipe.rules:
        lines.append("[[rules]]")
        for k, v in r.model_dump(mode="json", exclude_defaults=True).items():
            lines.append(f"{k} = {value(v)}")
        lines.append("")
    return "\n".join(lines)


def budget_for_bpw(params: int, bits_per_weight: float) -> int:
    """--target-bpw: the budget in bytes for this many bits per weight (bytes x 8 / parameters, as plans count it)."""
    return int(bits_per_weight * params / 8)
