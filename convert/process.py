"""This process's own figures: its peak resident set size."""

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
