"""A bundle against its runtime's own model class: every tensor name, shape and dtype, and every
quantized module's mode, bits and group size, as the runtime's loader sees them.

The runtime's own `load_model(path, lazy=True)` runs on the bundle directory (before anything is
written: on a header-only shadow of the plan, sparse shards whose headers are the real ones). MLX
arrays are lazy, so neither the model's parameters nor the bundle's weights are read or allocated,
whatever the model's size.  Only the loader's last step, `load_weights`, is replaced: instead of
installing the weights, fmtconv compares them with what the model built and quantized expects.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmtconv.convert.runtimes import Runtime, runtime_named
from fmtconv.errors import FmtconvError

if TYPE_CHECKING:
    from fmtconv.convert.layouts import ModelLayout
    from fmtconv.convert.plan import Plan

# module path -> (mode, bits, group_size): what the plan wrote for each quantized module.
Intent = dict[str, tuple[str, int, int]]
_SHOWN = 20  # differences quoted in an error message (all of them are in the report)


@dataclass
class Conformance:
    """The outcome of one check: problems found, or why it could not run."""

    runtime: str
    model_module: str
    problems: list[str] = field(default_factory=list)
    skipped: str | None = None
    tensors: int = 0
    quantized_modules: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.skipped is None and not self.problems

    def record(self) -> dict[str, Any]:
        """What config.json's fmtconv block keeps of the check: runtime, its version, model module and result."""
        from fmtconv.convert.runtimes import runtime_named

        result = "skipped: " + self.skipped if self.skipped else ("passed" if self.ok else f"{len(self.problems)} difference(s)")
        return {"runtime": self.runtime, "version": runtime_named(self.runtime).version(), "model_module": self.model_module,
                "result": result}

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "model_module": self.model_module, "ok": self.ok, "skipped": self.skipped,
                "problems": self.problems, "tensors": self.tensors, "quantized_modules": self.quantized_modules,
                "seconds": round(self.seconds, 3)}


def check_bundle(bundle: Path, runtime: Runtime | str, intent: Intent | None = None, *, require_model: bool = True,
                 layout: ModelLayout | None = None) -> Conformance:
    """Run the runtime's loader on `bundle` (a directory with config.json and shards) and compare.

    require_model=False (a model type no fmtconv layout claims): a runtime without that model skips the
    check with the reason, instead of failing it.  `layout`: the bundle's (default: the one its config records),
    whose kept-dtype tensors stand in for a model without a `cast_predicate`.
    """
    from fmtconv.convert.layouts import bundle_layout

    t0 = time.perf_counter()
    runtime = runtime_named(runtime) if isinstance(runtime, str) else runtime
    config = json.loads((Path(bundle) / "config.json").read_text())
    report = Conformance(runtime.name, runtime.model_module(config))
    if not runtime.installed():
        missing = " and ".join(runtime.missing())
        report.skipped = (f"{runtime.name} is not installed ({missing} not importable), so the bundle was not checked against "
                          f"{report.model_module} (pip install {runtime.name})")
        return report
    if not runtime.has_model(config):
        missing = (f"{runtime.name} {runtime.version()} has no model for model_type {config.get('model_type')!r} "
                   f"({report.model_module} does not exist)")
        if require_model:
            report.problems.append(missing)
        else:
            report.skipped = f"{missing}, so the bundle was not checked against a model class"
        return report
    try:
        model, weights = runtime.load_lazily(Path(bundle))
    except Exception as e:  # the runtime's own refusal (bad config key, unquantizable module, ...) is the finding
        report.problems.append(f"{runtime.name}'s loader refuses the bundle: {type(e).__name__}: {e}")
        report.seconds = time.perf_counter() - t0
        return report
    report.problems += compare(model, weights, config, intent, layout or bundle_layout(config))
    report.tensors = len(weights)
    report.quantized_modules = sum(1 for _, m in model.named_modules() if _quantized(m))
    report.seconds = time.perf_counter() - t0
    return report


def check_plan(plan: Plan, bundle: Path | None = None) -> Conformance:
    """`plan`'s bundle against its runtime, with the plan's per-module intent: the written `bundle`, or
    (None) a header-only shadow of what the plan will write, before anything is written.

    The shadow's shards are sparse files of the bundle's size in the temp directory; where they cannot be
    made (a file-size limit, a full temp disk), this check is skipped with the reason, and the check on
    the written bundle, before it becomes OUT, still runs.  A model type no layout claims (generic) is
    skipped, not failed, by a runtime without that model.
    """
    from fmtconv.convert.bundle.files import output_config
    from fmtconv.formats.safetensors_io import write_header_only, write_index

    def check(where: Path) -> Conformance:
        return check_bundle(where, plan.runtime, plan_intent(plan), require_model=plan.layout.family != "generic", layout=plan.layout)

    if bundle is not None:
        return check(bundle)
    with tempfile.TemporaryDirectory(prefix="fmtconv-shadow-") as tmp:
        shadow = Path(tmp)
        try:
            for specs, fname in zip(plan.shards, plan.shard_files):
                write_header_only(shadow / fname, specs, {"format": "mlx"})
        except OSError as e:
            report = Conformance(plan.runtime, plan.model_module)
            report.skipped = (f"the check before writing needs header-only shards in {tempfile.gettempdir()} and could not "
                              f"make them ({e.strerror}); the bundle is still checked against {plan.model_module} before it becomes OUT")
            return report
        write_index(shadow, plan.weight_map(), plan.total_bytes)
        (shadow / "config.json").write_text(json.dumps(output_config(plan)))
        return check(shadow)


def plan_intent(plan: Plan) -> Intent:
    """The runtime's module path -> what the plan writes for it, for every quantized module."""
    return {t.runtime_module: (t.mode, int(t.bits), int(t.group_size)) for t in plan.tensors if t.quantized}


def enforce(report: Conformance, where: Path | None = None) -> Conformance:
    """Raise FmtconvError listing the differences; warn (not silently pass) when the check was skipped."""
    if report.skipped:
        warnings.warn(report.skipped, RuntimeWarning, stacklevel=2)
        return report
    if report.problems:
        shown = "; ".join(report.problems[:_SHOWN])
        more = f" (and {len(report.problems) - _SHOWN} more)" if len(report.problems) > _SHOWN else ""
        raise FmtconvError(f"the bundle does not match {report.model_module} ({report.runtime}): "
                           f"{len(report.problems)} difference(s): {shown}{more}", file=where)
    return report


def compare(model: Any, weights: dict[str, Any], config: dict[str, Any], intent: Intent | None,
            layout: ModelLayout | None = None) -> list[str]:
    """Every difference between the runtime's model (built and quantized by its loader) and the weights.

    Floats must be in the model dtype where the model's `cast_predicate` (as its runtime's converter applies it)
    casts them; a model without one (jang's, for vMLX) is held to the layout's kept-dtype tensors."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = dict(tree_flatten(model.parameters()))
    cast = getattr(model, "cast_predicate", None) or (lambda k: not (layout is not None and layout.keeps_source_dtype(k)))
    dtype = _compute_dtype(config)
    problems = [f"missing tensor {k} ({_desc(params[k])} in the runtime's model)" for k in sorted(set(params) - set(weights))]
    problems += [f"tensor {k} ({_desc(weights[k])}) is not in the runtime's model" for k in sorted(set(weights) - set(params))]
    for k in sorted(set(params) & set(weights)):
        want, got = params[k], weights[k]
        if tuple(want.shape) != tuple(got.shape):
            problems.append(f"tensor {k}: shape {tuple(got.shape)}, the runtime's model has {tuple(want.shape)}")
        if mx.issubdtype(want.dtype, mx.floating):
            if not mx.issubdtype(got.dtype, mx.floating):
                problems.append(f"tensor {k}: dtype {_dt(got)}, the runtime expects a float")
            elif dtype is not None and cast(k) and got.dtype != dtype:
                problems.append(f"tensor {k}: dtype {_dt(got)}, the runtime casts it to the model dtype {_dt(dtype)}")
        elif got.dtype != want.dtype:
            problems.append(f"tensor {k}: dtype {_dt(got)}, the runtime's model has {_dt(want)}")
    modules = dict(model.named_modules())
    if intent is not None:
        for path, (mode, bits, group) in sorted(intent.items()):
            m = modules.get(path)
            if m is None:
                problems.append(f"module {path}: quantized in the bundle, but the runtime has no such module")
            elif not _quantized(m):
                problems.append(f"module {path}: written {_q(mode, bits, group)}, the runtime loads it unquantized")
            elif (m.mode, m.bits, m.group_size) != (mode, bits, group):
                problems.append(f"module {path}: written {_q(mode, bits, group)}, the runtime loads it as {_q(m.mode, m.bits, m.group_size)}")
        for path, m in sorted(modules.items()):
            if _quantized(m) and path not in intent:
                problems.append(f"module {path}: the runtime quantizes it ({_q(m.mode, m.bits, m.group_size)}), the bundle does not")
    for key, value in (config.get("quantization") or {}).items():
        if isinstance(value, dict) and key not in modules:
            problems.append(f"config.json quantization override {key!r} names no module of the runtime's model")
    return problems


def _quantized(m: Any) -> bool:
    return hasattr(m, "bits") and hasattr(m, "group_size") and "scales" in m


def _compute_dtype(config: dict[str, Any]):
    import mlx.core as mx

    for c in (config, config.get("text_config") or {}):
        for key in ("torch_dtype", "dtype"):
            if c.get(key) in ("bfloat16", "float16", "float32"):
                return getattr(mx, c[key])
    return None


def _q(mode: str, bits: int, group: int) -> str:
    return f"{bits}-bit {mode} group {group}"


def _dt(x: Any) -> str:
    return str(getattr(x, "dtype", x)).removeprefix("mlx.core.")


def _desc(a: Any) -> str:
    return f"{_dt(a)} {tuple(a.shape)}"
