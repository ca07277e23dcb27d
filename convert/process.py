"""This process's own figures (its peak resident set size), and how it starts a Python child."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int | None:
    """Peak RSS since exec: VmHWM from /proc/self/status (Linux), else ru_maxrss. On Linux a child's ru_maxrss starts at
    the RSS its parent had when it forked, so VmHWM is the figure that is the process's own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024) if peak else None  # bytes on macOS, KiB on Linux


def python_child(*args: str) -> list[str]:
    """The command line of a child Python running `args`, without the working directory first on its sys.path (-P,
    Python 3.11+): run from a clone of this repository, it would make the code folders importable as bare names, and
    transformers takes `kernels/` for Hugging Face's `kernels` package."""
    return [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), *args]
