"""`fmtconv eval`: a bundle against the exact source, at the model level, streamed layer by layer.

Two passes over the same token batch, each through the runtime's own forward:
1. the student (the bundle as its runtime loads it, in the bundle's dtypes): its logits;
2. the teacher (the source decoded exactly, float32, in the same model class): its logits, and at every decoder layer,
   with the teacher's input to that layer, the error of the student's layer (its own quantization, isolated) and of the
   teacher's layer with one module class at a time swapped for the student's modules.
Then KL(teacher || student), top-1/top-5 agreement and perplexities from the two logits.  Only one decoder layer's
weights of a model are resident at a time, so peak memory is the largest layer plus the activations, whatever the depth.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv.convert.check.eval import models, stream
from fmtconv.convert.check.eval.metrics import TokenStats, relative_error
from fmtconv.convert.check.eval.report import EvalReport
from fmtconv.convert.check.eval.tokens import TokenBatch, check_ids
from fmtconv.convert.naming import module_class
from fmtconv.convert.plan import read_config
from fmtconv.errors import FmtconvError

Progress = Callable[[str, int, int], None]  # (stage, done, total)
WORST = 3  # layers listed per module class


@dataclass
class _Setup:
    bundle: Path
    source: Path
    config: dict[str, Any]
    runtime: Any
    batch: np.ndarray  # [sequences, max length] int32, right-padded
    lengths: list[int]

    @property
    def mask(self) -> np.ndarray:
        return np.arange(self.batch.shape[1])[None, :] < np.asarray(self.lengths)[:, None]


def _setup(bundle: Path, source: Path, tokens: TokenBatch) -> _Setup:
    bundle, source = Path(bundle), Path(source)
    config = read_config(bundle)
    models.check_same_model(config, read_config(source), bundle, source)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int):
        check_ids(tokens.sequences, vocab)
    runtime = models.bundle_runtime(config)
    if not runtime.installed():
        raise FmtconvError(f"the bundle is written for {runtime.name}, which is not installed (pip install {runtime.name})",
                           file=bundle)
    lengths = [len(s) for s in tokens.sequences]
    batch = np.zeros((len(lengths), max(lengths)), dtype=np.int32)
    for i, s in enumerate(tokens.sequences):
        batch[i, : len(s)] = s
        batch[i, len(s) :] = s[-1]  # right padding: causal attention keeps it out of the real positions
    return _Setup(bundle, source, config, runtime, batch, lengths)


def _logits(runtime: Any, model: Any, batch: np.ndarray) -> np.ndarray:
    import mlx.core as mx

    out = runtime.sequence_logits(model, mx.array(batch)) if hasattr(runtime, "sequence_logits") else _text_logits(model, batch)
    out = out.astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def _text_logits(model: Any, batch: np.ndarray) -> Any:
    import mlx.core as mx

    text = model.language_model if hasattr(model, "language_model") else model
    out = text(mx.array(batch))
    return getattr(out, "logits", out)


def _token_stats(setup: _Setup, teacher: np.ndarray, student: np.ndarray) -> dict[str, Any]:
    stats = TokenStats()
    for b, n in enumerate(setup.lengths):
        stats.add(teacher[b, :n], student[b, :n], [int(t) for t in setup.batch[b, :n]])
    return stats.summary()


def _peak_rss_mb() -> float | None:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)


class _Student:
    """The bundle as its runtime loads it, lazily; weights handed out (and dropped) layer by layer."""

    def __init__(self, setup: _Setup, float32: bool):
        import mlx.core as mx

        self.model, self.weights = setup.runtime.load_lazily(setup.bundle)
        self.path = models.text_path(self.model, setup.config)
        self.dtype = mx.float32 if float32 else None
        self.float32 = float32

    def load(self, module: Any, names: list[str]) -> None:
        import mlx.core as mx

        self.model.load_weights([(n, self.weights.pop(n)) for n in names], strict=False)
        if self.float32:
            module.set_dtype(mx.float32)
        mx.eval(module.parameters())

    def layer_names(self, i: int) -> list[str]:
        prefix = self.path.layer_prefix(i)
        return [n for n in self.weights if n.startswith(prefix)]

    def outer_names(self) -> list[str]:
        return [n for n in self.weights if self.path.in_text(n) and self.path.layer_of(n) is None]


def _student_logits(setup: _Setup, float32: bool, progress: Progress | None) -> tuple[np.ndarray, Any]:
    import mlx.core as mx

    st = _Student(setup, float32)
    st.load(st.model, st.outer_names())
    n = len(st.path.layers)

    def hook(i: int, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        layer = st.path.layers[i]
        saved = stream.snapshot(layer)
        st.load(layer, st.layer_names(i))
        out = call(*args, **kwargs)
        mx.eval(stream.outputs(out))
        stream.release(layer, saved)
        if progress:
            progress("student", i + 1, n)
        return out

    undo = stream.install_hooks(st.path.layers, hook)
    try:
        logits = _logits(setup.runtime, st.model, setup.batch)
    finally:
        undo()
    dtype = next((str(v.dtype) for _, v in _flat(st.model.parameters()) if mx.issubdtype(v.dtype, mx.floating)), "float32")
    return logits, dtype.removeprefix("mlx.core.")


def _flat(tree: Any) -> list[tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(tree)


def _quantizable_paths(layer: Any) -> list[str]:
    """Paths (relative to the layer) of its weight-bearing leaf modules that a recipe can quantize."""
    return [p for p, m in layer.named_modules() if p and (hasattr(m, "to_quantized") or ("scales" in m and hasattr(m, "bits")))]


def _teacher_pass(setup: _Setup, student_float32: bool, progress: Progress | None) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, float]]:
    import mlx.core as mx

    model = models.build_skeleton(setup.runtime, models.teacher_config(setup.config))
    path = models.text_path(model, setup.config)
    teacher = models.TeacherWeights(setup.source, setup.config, setup.runtime)
    try:
        from mlx.utils import tree_flatten

        models.check_names(teacher, dict(tree_flatten(model.parameters())), path, setup.bundle)
        st = _Student(setup, student_float32)
        names = sorted(teacher.names())
        by_layer: dict[int | None, list[str]] = defaultdict(list)
        for n in names:
            if path.in_text(n):
                by_layer[path.layer_of(n)].append(n)
        model.load_weights(teacher.arrays(by_layer[None]), strict=False)
        st.load(st.model, st.outer_names())
        mx.eval(model.parameters())
        n_layers = len(path.layers)
        mask = setup.mask
        rows: list[dict[str, Any]] = [{} for _ in range(n_layers)]
        side: dict[str, float] = {}

        def hook(i: int, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
            layer, s_layer = path.layers[i], st.path.layers[i]
            saved, s_saved = stream.snapshot(layer), stream.snapshot(s_layer)
            model.load_weights(teacher.arrays(by_layer[i]), strict=False)
            mx.eval(layer.parameters())
            spare = stream.detached((args, kwargs))
            out = call(*args, **kwargs)
            want = stream.outputs(out)
            mx.eval(want)
            want_np = [np.array(w.astype(mx.float32)) for w in want]
            st.load(s_layer, st.layer_names(i))
            s_dtype = _float_dtype(s_layer)
            a, k = stream.cast_floats(stream.detached(spare), s_dtype)
            got = stream.outputs(s_layer(*a, **k))
            mx.eval(got)
            row: dict[str, Any] = {"layer": i, "rel_error": relative_error([np.array(g.astype(mx.float32)) for g in got], want_np, mask)}
            classes: dict[str, list[str]] = defaultdict(list)
            for p in _quantizable_paths(s_layer):
                classes[module_class(path.layer_prefix(i) + p)].append(p)
            per_class = {}
            for cls, paths in sorted(classes.items()):
                mine = {p: models._get(layer, p) for p in paths}
                for p in paths:
                    m = models._get(s_layer, p)
                    m.set_dtype(mx.float32)  # exact widening: the activations stay the teacher's float32
                    models.set_submodule(layer, p, m)
                try:
                    a, k = stream.detached(spare)
                    got_c = stream.outputs(call(*a, **k))
                    mx.eval(got_c)
                    per_class[cls] = relative_error([np.array(g.astype(mx.float32)) for g in got_c], want_np, mask)
                finally:
                    for p, m in mine.items():
                        models.set_submodule(layer, p, m)
            row["classes"] = per_class
            rows[i] = row
            stream.release(s_layer, s_saved)
            stream.release(layer, saved)
            if progress:
                progress("teacher", i + 1, n_layers)
            return out

        undo = [stream.install_hooks(path.layers, hook)]
        for p, m in model.named_modules():
            if not path.in_text(p) or path.layer_of(p + ".") is not None or path.layers_path.startswith(p):
                continue
            cls = module_class(p)
            if cls in ("embedding", "head") and "weight" in m:
                undo.append(stream.install_module_hook(m, _side_hook(cls, models._get(st.model, p), side, mask)))
        try:
            logits = _logits(setup.runtime, model, setup.batch)
        finally:
            for u in undo:
                u()
        return logits, rows, side
    finally:
        teacher.close()


def _side_hook(cls: str, student_module: Any, side: dict[str, float], mask: np.ndarray):
    """The embedding's or head's error: the student's module on the teacher's input to it."""
    import mlx.core as mx

    def hook(call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = call(*args, **kwargs)
        dtype = _float_dtype(student_module)
        got = student_module(*stream.cast_floats(args, dtype), **kwargs)
        mx.eval(out, got)
        side[cls] = relative_error([np.array(got.astype(mx.float32))], [np.array(out.astype(mx.float32))], mask)
        return out

    return hook


def _float_dtype(module: Any):
    import mlx.core as mx

    for _, v in _flat(module.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype
    return mx.float32


def _worst(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_class: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for r in rows:
        for cls, e in r.get("classes", {}).items():
            by_class[cls].append((e, r["layer"]))
    return {cls: [{"layer": i, "rel_error": e} for e, i in sorted(v, key=lambda t: (-t[0], t[1]))[:WORST]]
            for cls, v in sorted(by_class.items())}


def evaluate(bundle: str | Path, source: str | Path, tokens: TokenBatch, *, student_float32: bool = False,
             progress: Progress | None = None) -> EvalReport:
    """The streamed evaluation (see the module docstring)."""
    t0 = time.perf_counter()
    setup = _setup(bundle, source, tokens)
    notes = []
    try:
        s_logits, s_dtype = _student_logits(setup, student_float32, progress)
    except (RuntimeError, ValueError) as e:
        if student_float32:
            raise
        notes.append(f"the student ran in float32: MLX's CPU kernels refused its own dtypes ({type(e).__name__}: {e})")
        student_float32 = True
        s_logits, s_dtype = _student_logits(setup, True, progress)
    t_logits, rows, side = _teacher_pass(setup, student_float32, progress)
    report = EvalReport(str(setup.bundle), str(setup.source), setup.runtime.name, setup.runtime.model_module(setup.config),
                        tokens.source, len(setup.lengths), "float32", s_dtype, _token_stats(setup, t_logits, s_logits),
                        rows, _worst(rows), side.get("embedding"), side.get("head"), notes, teacher_logits=t_logits)
    report.peak_rss_mb = _peak_rss_mb()
    report.seconds = time.perf_counter() - t0
    return report


def evaluate_direct(bundle: str | Path, source: str | Path, tokens: TokenBatch, *, student_float32: bool = False) -> EvalReport:
    """Both whole models in memory, one plain forward each (no hooks): the check on the streamed evaluation."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    t0 = time.perf_counter()
    setup = _setup(bundle, source, tokens)
    student, weights = setup.runtime.load_lazily(setup.bundle)
    student.load_weights(list(weights.items()))
    if student_float32:
        student.set_dtype(mx.float32)
    mx.eval(student.parameters())
    s_logits = _logits(setup.runtime, student, setup.batch)
    model = models.build_skeleton(setup.runtime, models.teacher_config(setup.config))
    teacher = models.TeacherWeights(setup.source, setup.config, setup.runtime)
    try:
        path = models.text_path(model, setup.config)
        models.check_names(teacher, dict(tree_flatten(model.parameters())), path, setup.bundle)
        model.load_weights(teacher.arrays(sorted(n for n in teacher.names() if path.in_text(n))), strict=False)
    finally:
        teacher.close()
    t_logits = _logits(setup.runtime, model, setup.batch)
    s_dtype = "float32" if student_float32 else str(_float_dtype(student)).removeprefix("mlx.core.")
    report = EvalReport(str(setup.bundle), str(setup.source), setup.runtime.name, setup.runtime.model_module(setup.config),
                        tokens.source, len(setup.lengths), "float32", s_dtype, _token_stats(setup, t_logits, s_logits),
                        mode="direct", teacher_logits=t_logits)
    report.peak_rss_mb = _peak_rss_mb()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["EvalReport", "evaluate", "evaluate_direct"]
