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
from contextlib import contextmanager
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
from fmtconv.convert.process import peak_rss_bytes
from fmtconv.errors import FmtconvError

Progress = Callable[[str, int, int], None]  # (stage, done, total)
WORST = 3  # layers listed per module class


@dataclass
class _Setup:
    bundle: Path
    source: Path
    config: dict[str, Any]
    runtime: Any
    tokens: TokenBatch

    @property
    def batch(self) -> np.ndarray:  # [sequences, longest] int32, right-padded
        return self.tokens.padded()

    @property
    def lengths(self) -> list[int]:
        return self.tokens.lengths

    @property
    def mask(self) -> np.ndarray:
        return self.tokens.mask()


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
    return _Setup(bundle, source, config, runtime, tokens)


def sequence_logits(runtime: Any, model: Any, batch: np.ndarray) -> np.ndarray:
    """Float32 logits [sequences, positions, vocab] of a padded batch through the runtime's text path."""
    import mlx.core as mx

    out = runtime.sequence_logits(model, mx.array(batch)).astype(mx.float32)
    mx.eval(out)
    return np.array(out)


def token_stats(batch: np.ndarray, lengths: list[int], teacher: np.ndarray, student: np.ndarray) -> dict[str, Any]:
    """KL, agreement and perplexities of two models' logits on a padded batch (real positions only)."""
    stats = TokenStats()
    for b, n in enumerate(lengths):
        stats.add(teacher[b, :n], student[b, :n], [int(t) for t in batch[b, :n]])
    return stats.summary()


def _peak_rss_mb() -> float | None:
    peak = peak_rss_bytes()
    return round(peak / (1 << 20), 1) if peak else None


class _Student:
    """The bundle as its runtime loads it, lazily; weights handed out (and dropped) layer by layer."""

    def __init__(self, setup: _Setup, float32: bool):
        import mlx.core as mx

        self.model, self.weights = setup.runtime.load_lazily(setup.bundle)
        self.path = models.text_path(self.model, setup.config)
        self.dtype = mx.float32 if float32 else None
        self.float32 = float32

    def load(self, module: Any, names: list[str]) -> None:
        """Install these weights into the model (`module`: the part they belong to); only they are evaluated."""
        import mlx.core as mx

        arrays = [(n, self.weights.pop(n)) for n in names]
        if self.float32:
            arrays = [(n, a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a) for n, a in arrays]
        self.model.load_weights(arrays, strict=False)
        mx.eval([a for _, a in arrays])

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
        logits = sequence_logits(setup.runtime, st.model, setup.batch)
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

    teacher = models.TeacherModel(setup.source, setup.config, setup.runtime, setup.bundle)
    try:
        model, path = teacher.model, teacher.path
        st = _Student(setup, student_float32)
        teacher.load_outer()
        st.load(st.model, st.outer_names())
        n_layers = len(path.layers)
        mask = setup.mask
        rows: list[dict[str, Any]] = [{} for _ in range(n_layers)]
        side: dict[str, float] = {}

        def hook(i: int, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
            layer, s_layer = path.layers[i], st.path.layers[i]
            saved, s_saved = teacher.load_layer(i), stream.snapshot(s_layer)
            spare = stream.detached((args, kwargs))
            out = call(*args, **kwargs)
            want = stream.outputs(out)
            mx.eval(want)
            want_np = _numpy(want)
            st.load(s_layer, st.layer_names(i))
            a, k = stream.cast_floats(stream.detached(spare), _float_dtype(s_layer))
            got = stream.outputs(s_layer(*a, **k))
            mx.eval(got)
            row: dict[str, Any] = {"layer": i, "rel_error": relative_error(_numpy(got), want_np, mask)}
            classes: dict[str, list[str]] = defaultdict(list)
            for p in _quantizable_paths(s_layer):
                classes[module_class(path.layer_prefix(i) + p)].append(p)
            per_class = {}
            for cls, paths in sorted(classes.items()):
                with swapped(layer, {p: _as_float32(models.get_submodule(s_layer, p)) for p in paths}):
                    a, k = stream.detached(spare)
                    got_c = stream.outputs(call(*a, **k))
                    mx.eval(got_c)
                per_class[cls] = relative_error(_numpy(got_c), want_np, mask)
            row["classes"] = per_class
            rows[i] = row
            stream.release(s_layer, s_saved)
            teacher.release_layer(i, saved)
            if progress:
                progress("teacher", i + 1, n_layers)
            return out

        undo = [stream.install_hooks(path.layers, hook)]
        for p, m in side_modules(model, path):
            undo.append(stream.install_module_hook(m, _side_hook(module_class(p), models.get_submodule(st.model, p), side, mask)))
        try:
            logits = sequence_logits(setup.runtime, model, setup.batch)
        finally:
            for u in undo:
                u()
        return logits, rows, side
    finally:
        teacher.close()


def side_modules(model: Any, path: models.TextPath) -> list[tuple[str, Any]]:
    """The text model's embedding and head modules (outside the decoder layers), with their paths."""
    out = []
    for p, m in model.named_modules():
        if not path.in_text(p) or path.layer_of(p + ".") is not None or path.layers_path.startswith(p):
            continue
        if module_class(p) in ("embedding", "head") and "weight" in m:
            out.append((p, m))
    return out


@contextmanager
def swapped(root: Any, modules: dict[str, Any]):
    """Within the block, the modules at these paths (relative to root) are the given ones; then the originals again."""
    originals = {p: models.get_submodule(root, p) for p in modules}
    try:
        for p, m in modules.items():
            models.set_submodule(root, p, m)
        yield
    finally:
        for p, m in originals.items():
            models.set_submodule(root, p, m)


def _as_float32(module: Any) -> Any:
    """The module with float32 scales, biases and weights (exact widening): the activations stay the teacher's float32."""
    import mlx.core as mx

    module.set_dtype(mx.float32)
    return module


def _numpy(arrays: list[Any]) -> list[np.ndarray]:
    import mlx.core as mx

    return [np.array(a.astype(mx.float32)) for a in arrays]


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
                        tokens.source, len(setup.lengths), "float32", s_dtype, token_stats(setup.batch, setup.lengths, t_logits, s_logits),
                        rows, _worst(rows), side.get("embedding"), side.get("head"), notes, teacher_logits=t_logits)
    report.peak_rss_mb = _peak_rss_mb()
    report.seconds = time.perf_counter() - t0
    return report


def evaluate_direct(bundle: str | Path, source: str | Path, tokens: TokenBatch, *, student_float32: bool = False) -> EvalReport:
    """Both whole models in memory, one plain forward each (no hooks): the check on the streamed evaluation."""
    import mlx.core as mx

    t0 = time.perf_counter()
    setup = _setup(bundle, source, tokens)
    student, weights = setup.runtime.load_lazily(setup.bundle)
    student.load_weights(list(weights.items()))
    if student_float32:
        student.set_dtype(mx.float32)
    mx.eval(student.parameters())
    s_logits = sequence_logits(setup.runtime, student, setup.batch)
    teacher = models.TeacherModel(setup.source, setup.config, setup.runtime, setup.bundle)
    try:
        teacher.load_all()
    finally:
        teacher.close()
    model = teacher.model
    t_logits = sequence_logits(setup.runtime, model, setup.batch)
    s_dtype = "float32" if student_float32 else str(_float_dtype(student)).removeprefix("mlx.core.")
    report = EvalReport(str(setup.bundle), str(setup.source), setup.runtime.name, setup.runtime.model_module(setup.config),
                        tokens.source, len(setup.lengths), "float32", s_dtype, token_stats(setup.batch, setup.lengths, t_logits, s_logits),
                        mode="direct", teacher_logits=t_logits)
    report.peak_rss_mb = _peak_rss_mb()
    report.seconds = time.perf_counter() - t0
    return report


__all__ = ["EvalReport", "evaluate", "evaluate_direct"]
