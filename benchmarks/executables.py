"""Where the benchmarks find the programs they time: ``edgert`` and llama.cpp's own tools."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def find_edgert(explicit: str | None = None) -> str:
    """``explicit``, else the ``edgert`` beside this Python (the venv's), else the one on PATH."""
    if explicit:
        return explicit
    beside = Path(sys.executable).with_name("edgert")
    if beside.exists():
        return str(beside)
    found = shutil.which("edgert")
    if found is None:
        sys.exit(f"{Path(sys.argv[0]).name}: no `edgert` beside this Python or on PATH; install the package")
    return found


def find_llama_tool(name: str, explicit: str | None = None) -> str | None:
    """A native llama.cpp tool (``llama-bench``, ``llama-perplexity``): ``explicit``, else on PATH,
    else in ./bin (where scripts/build_llama_tools.sh puts it)."""
    if explicit:
        return explicit
    found = shutil.which(name)
    if found:
        return found
    local = REPO_ROOT / "bin" / name
    return str(local) if local.exists() and os.access(local, os.X_OK) else None
