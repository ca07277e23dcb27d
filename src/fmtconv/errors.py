"""The one exception type fmtconv raises for bad input."""

from __future__ import annotations

from pathlib import Path


class FmtconvError(Exception):
    """Bad input or a refused operation; the message names the file, the tensor and what was expected."""

    def __init__(self, message: str, *, file: str | Path | None = None, tensor: str | None = None):
        self.file = str(file) if file is not None else None
        self.tensor = tensor
        where = []
        if file is not None:
            where.append(f"file {self.file}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
