"""Runs a model's own forward pass with its decoder layers streamed: each layer's weights are loaded just before the
layer runs and released after it, so at any moment one layer's weights are resident (plus the embedding, final norm
and head), whatever the depth.

The runtime's own `__call__` drives the pass (masks, hyper-connections, hash routing, the head); fmtconv only swaps
each decoder layer object's class for a subclass whose `__call__` loads, runs, evaluates and releases.  MLX is lazy,
so the layer's output is evaluated inside the hook: its graph, and the weights it referenced, are gone when the next
layer loads.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

# hook(layer index, the layer's original call, args, kwargs) -> the layer's output
LayerHook = Callable[[int, Callable[..., Any], tuple, dict], Any]


def install_hooks(layers: list[Any], hook: LayerHook) -> Callable[[], None]:
    """Route every call of each layer object through `hook`; returns the function that undoes it."""
    originals = []
    for i, layer in enumerate(layers):
        cls = type(layer)

        def call(self, *args, _i=i, _cls=cls, **kwargs):
            return hook(_i, lambda *a, **k: _cls.__call__(self, *a, **k), args, kwargs)

        layer.__class__ = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__})
        originals.append((layer, cls))

    def undo() -> None:
        for layer, cls in originals:
            layer.__class__ = cls

    return undo


def install_module_hook(module: Any, hook: Callable[[Callable[..., Any], tuple, dict], Any]) -> Callable[[], None]:
    """The same for one module (an embedding, a head)."""
    cls = type(module)

    def call(self, *args, **kwargs):
        return hook(lambda *a, **k: cls.__call__(self, *a, **k), args, kwargs)

    module.__class__ = type(cls.__name__, (cls,), {"__call__": call, "__module__": cls.__module__})

    def undo() -> None:
        module.__class__ = cls

    return undo


def outputs(out: Any) -> list[Any]:
    """The arrays a layer returns (one, or a tuple such as DeepSeek-V4.1's (streams, pre_mix))."""
    import mlx.core as mx

    if isinstance(out, mx.array):
        return [out]
    if isinstance(out, (tuple, list)):
        return [o for o in out if isinstance(o, mx.array)]
    return [getattr(out, "logits", out)]


def detached(value: Any) -> Any:
    """A copy of a layer call's arguments that a second call cannot change under the first (caches and shared state
    are copied; MLX arrays too, since item assignment rebinds them in place)."""
    return copy.deepcopy(value)


def cast_floats(value: Any, dtype: Any) -> Any:
    """Arguments with every floating MLX array cast to `dtype` (activations of the student's dtype); the rest as is."""
    import mlx.core as mx

    if isinstance(value, mx.array):
        return value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
    if isinstance(value, tuple):
        return tuple(cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [cast_floats(v, dtype) for v in value]
    if isinstance(value, dict) and not hasattr(value, "parameters"):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def snapshot(module: Any) -> dict[str, Any]:
    """The module's parameters as they are (lazily initialised, never evaluated): restoring them releases loaded weights."""
    return module.parameters()


def release(module: Any, saved: dict[str, Any]) -> None:
    import mlx.core as mx

    module.update(saved, strict=False)
    mx.clear_cache()
