"""English prose that every Python installation carries, for prompts and perplexity.

``pydoc_data.topics`` holds the Python documentation's topic pages (~465 KB of text), so the bench,
the tests and the benchmarks have real prose to read on any machine without shipping or fetching a
corpus. The user's own text (``--text FILE``, ``--prompt-file``) always takes precedence.
"""

from __future__ import annotations

from edge_runtime.errors import EdgeRuntimeError

SOURCE_NAME = "pydoc_data.topics (the Python documentation)"


def python_docs_text(max_chars: int | None = None) -> str:
    """The Python documentation's topic pages joined in a fixed order, cut to ``max_chars``.

    Raises when this interpreter was installed without ``pydoc_data`` (some distributions split
    it off) or it comes out empty, rather than handing callers an empty string.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise EdgeRuntimeError(f"this Python has no pydoc_data ({exc})",
                               "give a text file of your own (--text FILE or --prompt-file FILE)") from None
    text = "\n\n".join(topics[key].strip() for key in sorted(topics))
    if not text.strip():
        raise EdgeRuntimeError("pydoc_data.topics is empty", "give a text file of your own")
    return text if max_chars is None else text[:max_chars]
