"""Keep the repository root off the import path, in this process and in the test's child processes.

The code folders sit at the root (`convert/`, `formats/`, `kernels/`, …) and install under the one name `fmtconv`.
`python -m pytest` and `python -m fmtconv.convert.cli` put the working directory first on sys.path, which would make
them importable as bare top-level names too: transformers 5.25 then takes `kernels/` for Hugging Face's `kernels`
package (find_spec finds it) and fails importing from it.  PYTHONSAFEPATH (Python 3.11+) stops child processes
from adding their working directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != ROOT]
os.environ["PYTHONSAFEPATH"] = "1"
