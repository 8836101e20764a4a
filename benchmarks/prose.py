"""A text file of English prose for benchmarks that read ``--text FILE``: the Python documentation
every installation carries (``pydoc_data.topics``), written once to a temporary folder."""

from __future__ import annotations

import tempfile
from pathlib import Path


def prose_file(max_chars: int | None = None) -> Path:
    """The Python documentation's topic pages (cut to ``max_chars``) as a UTF-8 file."""
    from edge_runtime.sample_text import python_docs_text

    path = Path(tempfile.mkdtemp(prefix="edgert-bench-")) / "python-docs.txt"
    path.write_text(python_docs_text(max_chars), encoding="utf-8")
    return path
