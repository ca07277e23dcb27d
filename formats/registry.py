"""Codec registry: format name -> codec class, so other converters can look codecs up and add their own."""

from __future__ import annotations

from fmtconv.errors import FmtconvError
from fmtconv.formats.base import Codec

_CODECS: dict[str, type[Codec]] = {}


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Register a codec class under `cls.name` (usable as a class decorator); re-registering replaces."""
    if not (isinstance(cls, type) and issubclass(cls, Codec)) or not getattr(cls, "name", None):
        raise TypeError(f"{cls!r} is not a Codec subclass with a name")
    _CODECS[cls.name] = cls
    return cls


def get_codec(name: str) -> Codec:
    """A codec instance by its registered name."""
    try:
        return _CODECS[name]()
    except KeyError:
        raise FmtconvError(f"no codec named {name!r}; known: {', '.join(sorted(_CODECS))}") from None


def codec_names() -> list[str]:
    """Registered codec names, sorted."""
    return sorted(_CODECS)


def codec_classes() -> list[type[Codec]]:
    """Registered codec classes in the order grouping asks them (ascending priority)."""
    return sorted(_CODECS.values(), key=lambda c: (c.priority, c.name))
