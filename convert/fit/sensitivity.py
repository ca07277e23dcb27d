"""How much each unit's quantization costs, measured: the teacher (the source decoded exactly, float32, in the runtime's
own model class) runs on calibration tokens layer by layer, as `fmtconv eval` runs it, and at every decoder layer each
unit of that layer is quantized at each candidate while everything else stays at the teacher.

The measure, and why.  Each unit at each candidate gets D, the squared change of its layer's output (the residual
stream) on the teacher's input: local, cheap, and additive over the units of a layer (independent errors add in
squared norm).  What D costs at the end depends on where it enters: a change early in a small residual stream is
amplified by every later layer's normalisation, one before the head is not.  So the same pass also carries one forked
copy of the batch per decoder layer (and one for the embedding): from its layer on, that copy runs with all of that
layer's units at a reference candidate, and its final KL against the teacher, over its D, is the layer's gain.  A unit
then costs gain x D in nats (KL is quadratic in small logit changes, so it grows with D); the head is measured in KL
directly.  The forks are extra rows of the same batch, so one layer's weights are resident at a time, as in
`fmtconv eval`; the copies' activations and logits grow with the number of forks, so the forks run in passes of at
most FORKS_PER_PASS forks and FORK_BYTES of logits (a deep model decodes its layers once more per pass; its memory
does not grow with its depth).  A final pass with every unit at the reference compares the additive prediction with
the measured KL.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmtconv import __version__
from fmtconv.convert.bundle.files import output_config
from fmtconv.convert.check.eval import models, stream
from fmtconv.convert.check.eval.metrics import masked_sq_sum, mean_kl
from fmtconv.convert.check.eval.run import _numpy, sequence_logits, side_modules, swapped
from fmtconv.convert.check.eval.tokens import TokenBatch
from fmtconv.convert.encode import TensorEncoder
from fmtconv.convert.fit.candidates import KEEP, REFERENCE, SAFE, Candidate, Unit
from fmtconv.convert.plan import Plan, PlannedTensor, build_plan
from fmtconv.convert.recipes import recipe_from_dict
from fmtconv.convert.runtimes import runtime_named
from fmtconv.formats.safetensors_io import Checkpoint

SENSITIVITY_VERSION = 2  # bump when the measure changes: cached tables of another version are not used
Progress = Callable[[str, int, int], None]


@dataclass
class Sensitivity:
    """Predicted KL (nats per token) of each unit at each candidate, with the figures behind it."""

    costs: dict[str, dict[Candidate, float]]
    gains: dict[str, float]  # per fork (decoder layer, or "embedding"): KL per unit of squared output change
    kl_reference: float  # measured KL with every unit at the reference candidate
    predicted_reference: float  # the additive prediction of the same
    tokens: int
    meta: dict[str, Any] = field(default_factory=dict)

    def kl(self, unit: str, c: Candidate) -> float:
        return self.costs[unit][c]

    def predicted_kl(self, choice: dict[str, Candidate]) -> float:
        return sum(self.kl(u, c) for u, c in choice.items())

    def to_json(self) -> dict[str, Any]:
        return {"version": SENSITIVITY_VERSION, "gains": self.gains, "kl_reference": self.kl_reference,
                "predicted_reference": self.predicted_reference, "tokens": self.tokens, "meta": self.meta,
                "costs": {u: [[c.to_json(), v] for c, v in sorted(cs.items())] for u, cs in self.costs.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Sensitivity:
        costs = {u: {Candidate.from_json(c): float(v) for c, v in cs} for u, cs in d["costs"].items()}
        return cls(costs, {k: float(v) for k, v in d["gains"].items()}, float(d["kl_reference"]),
                   float(d["predicted_reference"]), int(d["tokens"]), d.get("meta", {}))


# ---------------------------------------------------------------------------------------------
# The cache: next to the source, keyed by what the figures depend on
# ---------------------------------------------------------------------------------------------


def cache_key(keep_plan: Plan, tokens: TokenBatch, candidates: dict[str, list[Candidate]], settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([__version__, SENSITIVITY_VERSION, sorted(keep_plan.source_files.items()), keep_plan.layout.family,
                         keep_plan.runtime, settings, tokens.sequences,
                         {u: [c.label for c in cs] for u, cs in sorted(candidates.items())}], sort_keys=True).encode())
    return h.hexdigest()[:24]


def cache_dirs(source: Path, override: Path | None = None) -> list[Path]:
    """Where cached tables may live: --fit-cache / FMTCONV_CACHE_DIR, else beside the source (`SRC.fmtconv-cache/`, never
    inside it), else the user cache directory."""
    if override is not None:
        return [Path(override)]
    if os.environ.get("FMTCONV_CACHE_DIR"):
        return [Path(os.environ["FMTCONV_CACHE_DIR"])]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fmtconv"
    src = Path(source).resolve()
    return [src.with_name(src.name + ".fmtconv-cache"), user]


def load_cached(dirs: list[Path], key: str) -> Sensitivity | None:
    for d in dirs:
        path = d / f"sensitivity-{key}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("version") == SENSITIVITY_VERSION:
            return Sensitivity.from_json(data)
    return None


def save_cached(dirs: list[Path], key: str, table: Sensitivity) -> Path | None:
    """Write the table to the first directory that takes it (atomically); None where none does."""
    for d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".sensitivity-", suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(table.to_json(), f)
            path = d / f"sensitivity-{key}.json"
            os.replace(tmp, path)
            return path
        except OSError:
            continue
    return None


# ---------------------------------------------------------------------------------------------
# Quantizing a unit at a candidate, in memory, through the pipeline's own encoders
# ---------------------------------------------------------------------------------------------


class CandidateEncoder:
    """Each candidate's plan of the source (one rule for every quantizable module), and the unit's modules encoded by it."""

    def __init__(self, source: Path, keep_plan: Plan, settings: dict[str, Any]):
        self.source, self.keep_plan, self.settings = source, keep_plan, settings
        self._plans: dict[Candidate, tuple[dict[str, PlannedTensor], TensorEncoder]] = {}
        self.ck = Checkpoint(source)

    def close(self) -> None:
        self.ck.close()

    def _plan(self, c: Candidate) -> tuple[dict[str, PlannedTensor], TensorEncoder]:
        if c not in self._plans:
            rule = {"mode": "keep"} if c == KEEP else {**c.rule(), "on_indivisible": "keep"}
            recipe = recipe_from_dict({"name": f"candidate {c.label}", "rules": [rule]})
            p = build_plan(self.source, recipe, family=self.keep_plan.layout.family, runtime=self.keep_plan.runtime, **self.settings)
            self._plans[c] = ({t.target.name: t for t in p.tensors}, TensorEncoder(p))
        return self._plans[c]

    def arrays(self, t: PlannedTensor, c: Candidate) -> dict[str, np.ndarray]:
        """The module's stored parts at candidate c: {"weight"} (kept), or {"weight", "scales"[, "biases"]}."""
        by_name, enc = self._plan(c)
        pt = by_name[t.target.name]
        out = enc.encode_tensor(self.ck, pt)
        self.ck.release_all()  # fault-around leaves neighbouring pages mapped; none need stay
        prefix = pt.target.module + "."
        return {k[len(prefix):] if k.startswith(prefix) else "weight": v for k, v in out.items()}


def _mx(a: np.ndarray):
    import mlx.core as mx

    return mx.array(a.astype(np.float32) if a.dtype.kind == "V" or a.dtype.name == "bfloat16" or a.dtype.kind == "f" else a)


@contextmanager
def applied(root: Any, rel_paths: list[str], parts: list[dict[str, np.ndarray]], c: Candidate):
    """Within the block, the modules at rel_paths (under `root`) hold the candidate's weights: quantized modules built
    by each module's own `to_quantized` (swapped in; yielded by path), or, kept, the module's own weight rounded to the
    compute dtype; float32 activations throughout."""
    import mlx.core as mx

    with ExitStack() as stack:
        swaps = {}
        for p, arrs in zip(rel_paths, parts):
            m = models.get_submodule(root, p)
            if c.mode == "keep":
                old = m.weight
                m.weight = _mx(arrs["weight"])
                stack.callback(setattr, m, "weight", old)
                continue
            q = m.to_quantized(group_size=c.group_size, bits=c.bits, mode=c.mode)
            q.update({k: _mx(v) for k, v in arrs.items()}, strict=False)
            q.set_dtype(mx.float32)
            swaps[p] = q
        stack.enter_context(swapped(root, swaps))
        yield swaps


# ---------------------------------------------------------------------------------------------
# The passes
# ---------------------------------------------------------------------------------------------


class _Copies:
    """A batch replicated `n` times: copy 0 is the teacher, copy k the fork k.  Slices a layer call's batch-major
    arguments (dimension 0 = n x rows, positions next) to chosen copies."""

    def __init__(self, n: int, rows: int, positions: int):
        self.n, self.rows, self.positions = n, rows, positions

    def _is_batch(self, a: Any) -> bool:
        import mlx.core as mx

        return (isinstance(a, mx.array) and a.ndim >= 2 and a.shape[0] == self.n * self.rows and self.n > 1
                and self.positions in a.shape[1:3])

    def take(self, value: Any, copies: list[int]) -> Any:
        import mlx.core as mx

        if self._is_batch(value):
            return mx.concatenate([value[c * self.rows : (c + 1) * self.rows] for c in copies]) if copies else value[:0]
        if isinstance(value, tuple):
            return tuple(self.take(v, copies) for v in value)
        if isinstance(value, list):
            return [self.take(v, copies) for v in value]
        if isinstance(value, dict) and not hasattr(value, "parameters"):
            return {k: self.take(v, copies) for k, v in value.items()}
        return value


def _join(template: Any, arrays: list[Any]) -> Any:
    """The layer's output structure (an array, or a tuple of them) rebuilt from its arrays."""
    import mlx.core as mx

    if isinstance(template, mx.array):
        return arrays[0]
    it = iter(arrays)
    return type(template)(next(it) if isinstance(x, mx.array) else x for x in template)


# One pass's forks: their copies' float32 logits at most about FORK_BYTES, and at most FORKS_PER_PASS of them (each
# copy also holds its activations); more forks run in more passes, each decoding the teacher's layers once more.
FORK_BYTES = 1 << 30
FORKS_PER_PASS = 8


def fork_passes(forks: list[int | str], copy_bytes: int, budget: int = FORK_BYTES) -> list[list[int | str]]:
    """The forks cut into passes whose copies (each pass also carries the teacher's) hold at most `budget` bytes of
    logits and number at most FORKS_PER_PASS, at least one fork a pass: a pass's memory does not grow with the depth."""
    k = min(FORKS_PER_PASS, max(1, budget // max(copy_bytes, 1) - 1))
    return [forks[a : a + k] for a in range(0, len(forks), k)] or [[]]


def measure(source: Path, keep_plan: Plan, units: list[Unit], candidates: dict[str, list[Candidate]], tokens: TokenBatch,
            settings: dict[str, Any], progress: Progress | None = None, fork_bytes: int = FORK_BYTES) -> Sensitivity:
    """The sensitivity table of `units` (from `keep_plan`, the keep-everything plan of the bundle's layout and runtime)."""
    import mlx.core as mx

    runtime = runtime_named(keep_plan.runtime)
    config = output_config(keep_plan)
    layout = keep_plan.layout
    teacher = models.TeacherModel(Path(source), config, runtime, Path(source))
    enc = CandidateEncoder(Path(source), keep_plan, settings)
    ids, mask = tokens.padded(), tokens.mask()
    rows = len(tokens.sequences)
    path = teacher.path
    by_layer: dict[int | None, list[Unit]] = {}
    rel: dict[str, list[str]] = {}  # unit -> module paths relative to its layer (outside the layers: to the model)
    for u in units:
        by_layer.setdefault(u.layer, []).append(u)
        rel[u.key] = [m[len(path.layer_prefix(u.layer)):] if u.layer is not None else m for m in u.modules]
    reference = {u.key: (REFERENCE if REFERENCE in candidates[u.key] else _nearest(candidates[u.key])) for u in units}
    head = {u.key for u in units if u.layer is None and u.cls == "head"}
    embedding = [u for u in units if u.layer is None and u.cls != "head"]
    # Forks: one per decoder layer with units, and the embedding's, in passes of a bounded number of copies.
    forks: list[int | str] = sorted(i for i in by_layer if i is not None) + (["embedding"] if embedding else [])
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size") or 1
    passes = fork_passes(forks, rows * ids.shape[1] * int(vocab) * 4, fork_bytes)
    local: dict[str, dict[Candidate, float]] = {u.key: {} for u in units}  # D, or KL for the head
    fork_d: dict[int | str, float] = {}
    gains: dict[str, float] = {}

    def references(root: Any, group: list[Unit]) -> ExitStack:
        stack = ExitStack()
        for u in group:
            stack.enter_context(applied(root, rel[u.key], [enc.arrays(t, reference[u.key]) for t in u.tensors], reference[u.key]))
        return stack

    def one_pass(group: list[int | str], first: bool, label: str) -> np.ndarray:
        """Logits of the teacher (copy 0) and of the group's forks (copy k + 1: fork k); the first pass also measures
        every unit at every candidate."""
        n_copies = 1 + len(group)
        if n_copies * rows == ids.shape[1]:  # keep a batch size apart from the length: a [L, L] mask is no batch
            n_copies += 1
        copies = _Copies(n_copies, rows, ids.shape[1])
        fork_of = {f: k + 1 for k, f in enumerate(group)}
        n_layers = len(path.layers)

        def layer_hook(i: int, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
            layer = path.layers[i]
            saved = teacher.load_layer(i)
            # The teacher's input, with copies of the caches and shared state as they are before the call below
            # changes them (mlx-lm's DeepSeek-V4 layers append to a window cache and hand keys on to later layers).
            spare = stream.detached(copies.take((args, kwargs), [0]))
            out = call(*args, **kwargs)  # every copy at the teacher's weights, on its own input
            outs = stream.outputs(out)
            want_mx = [o[:rows] for o in outs]
            want = _numpy(want_mx)
            for u in by_layer.get(i, []) if first else []:
                for c in candidates[u.key]:
                    with applied(layer, rel[u.key], [enc.arrays(t, c) for t in u.tensors], c):
                        a, k = stream.detached(spare)
                        got = _numpy(stream.outputs(call(*a, **k)))
                    local[u.key][c] = sum(masked_sq_sum(g - w, mask) for g, w in zip(got, want))
            if i in fork_of:  # this layer's fork leaves the teacher's path here
                with references(layer, by_layer[i]):
                    a, k = stream.detached(spare)
                    fork_out = stream.outputs(call(*a, **k))
                    mx.eval(fork_out)
                fork_d[i] = sum(masked_sq_sum(g - w, mask) for g, w in zip(_numpy(fork_out), want))
                c = fork_of[i]
                outs = [mx.concatenate([o[: c * rows], f, o[(c + 1) * rows :]]) for o, f in zip(outs, fork_out)]
            mx.eval(outs)
            teacher.release_layer(i, saved)
            if progress:
                progress(label, i + 1, n_layers)
            return _join(out, outs)

        def side_hook(u: Unit | None, module_path: str, kind: str):
            def hook(call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
                out = call(*args, **kwargs)
                if u is None or not (first or "embedding" in fork_of and kind == "embedding"):
                    return out
                a0 = copies.take(args, [0])
                want_mx = out[: copies.rows] if copies.n > 1 else out
                want = np.array(want_mx.astype(mx.float32))
                parent, name = module_path.rsplit(".", 1) if "." in module_path else ("", module_path)
                root = models.get_submodule(teacher.model, parent) if parent else teacher.model

                def run_at(c: Candidate) -> Any:
                    with applied(root, [name], [enc.arrays(t, c) for t in u.tensors], c) as swaps:
                        # kept: this (hooked) module with its rounded weight, through the original call
                        got = swaps[name](*a0, **kwargs) if name in swaps else call(*a0, **kwargs)
                        mx.eval(got)
                        return got

                for c in candidates[u.key] if first else []:
                    got = np.array(run_at(c).astype(mx.float32))
                    local[u.key][c] = mean_kl(want, got, mask) if kind == "head" else masked_sq_sum(got - want, mask)
                if kind == "embedding" and "embedding" in fork_of:
                    ref = run_at(reference[u.key])
                    fork_d["embedding"] = masked_sq_sum(np.array(ref.astype(mx.float32)) - want, mask)
                    parts = [ref if c == fork_of["embedding"] else want_mx for c in range(copies.n)]
                    return mx.concatenate(parts)
                return out
            return hook

        undo = [stream.install_hooks(path.layers, layer_hook)]
        side_units = {rel[u.key][0]: u for u in units if u.layer is None}
        for p, m in side_modules(teacher.model, path):
            u = side_units.get(p)
            undo.append(stream.install_module_hook(m, side_hook(u, p, "head" if u is not None and u.key in head else "embedding")))
        try:
            return sequence_logits(runtime, teacher.model, np.concatenate([ids] * copies.n))
        finally:
            for f in undo:
                f()

    try:
        teacher.load_outer()
        t_logits = None
        for n, group in enumerate(passes):
            label = "sensitivity" if len(passes) == 1 else f"sensitivity {n + 1}/{len(passes)}"
            logits = one_pass(group, n == 0, label)
            if t_logits is None:
                t_logits = logits[:rows].copy()
            for k, f in enumerate(group):
                kl = mean_kl(t_logits, logits[(k + 1) * rows : (k + 2) * rows], mask)
                gains[str(f)] = kl / fork_d[f] if fork_d.get(f, 0.0) > 0 else 0.0
            del logits
        costs = {}
        unmeasured = []
        for u in units:
            if not local[u.key]:  # a module the runtime's forward never calls as one (vMLX's head: a plain matmul)
                unmeasured.append(u.key)
                safe = SAFE if SAFE in candidates[u.key] else KEEP
                costs[u.key] = {safe: 0.0}
                continue
            g = 1.0 if u.key in head else gains[str(u.layer if u.layer is not None else "embedding")]
            costs[u.key] = {c: g * v for c, v in local[u.key].items()}
        kl_ref = _reference_kl(teacher, enc, units, rel, reference, ids, t_logits, mask, runtime, progress)
    finally:
        enc.close()
        teacher.close()
    predicted = sum(costs[u.key].get(reference[u.key], 0.0) for u in units)
    return Sensitivity(costs, gains, float(kl_ref), float(predicted), int(tokens.count),
                       {"source": str(source), "runtime": keep_plan.runtime, "layout": layout.family, **settings,
                        "unmeasured": unmeasured})


def _reference_kl(teacher: models.TeacherModel, enc: CandidateEncoder, units: list[Unit], rel: dict[str, list[str]],
                  reference: dict[str, Candidate], ids: np.ndarray, t_logits: np.ndarray, mask: np.ndarray, runtime: Any,
                  progress: Progress | None) -> float:
    """KL of the teacher with every unit at its reference candidate: the check on the additive prediction."""
    import mlx.core as mx

    path = teacher.path
    n_layers = len(path.layers)

    def layer_hook(i: int, call: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        saved = teacher.load_layer(i)
        with ExitStack() as stack:
            for u in (u for u in units if u.layer == i):
                c = reference[u.key]
                stack.enter_context(applied(path.layers[i], rel[u.key], [enc.arrays(t, c) for t in u.tensors], c))
            out = call(*args, **kwargs)
            mx.eval(stream.outputs(out))
        teacher.release_layer(i, saved)
        if progress:
            progress("reference", i + 1, n_layers)
        return out

    undo = stream.install_hooks(path.layers, layer_hook)
    try:
        with ExitStack() as stack:
            for u in (u for u in units if u.layer is None):
                p = rel[u.key][0]
                parent, name = p.rsplit(".", 1) if "." in p else ("", p)
                root = models.get_submodule(teacher.model, parent) if parent else teacher.model
                c = reference[u.key]
                stack.enter_context(applied(root, [name], [enc.arrays(t, c) for t in u.tensors], c))
            logits = sequence_logits(runtime, teacher.model, ids)
    finally:
        undo()
    return mean_kl(t_logits, logits, mask)


def _nearest(cands: list[Candidate]) -> Candidate:
    """The candidate closest to the reference: affine 4-bit at the nearest group that fits, else kept."""
    affine = [c for c in cands if c.mode == "affine" and c.bits == REFERENCE.bits and c.encoder == REFERENCE.encoder]
    return min(affine, key=lambda c: abs(c.group_size - REFERENCE.group_size)) if affine else KEEP
