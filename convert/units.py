"""Human-readable sizes for the CLI and the model card."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """Decimal units, as disk sizes are quoted: 512 B, 1.50 KB, 4.52 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"
