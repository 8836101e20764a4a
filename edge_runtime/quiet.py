"""Holding back what native libraries print on stderr (LiteRT's accelerator probes, torch's and
transformers' import-time warnings), so a user sees our messages and nothing else."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_native_stderr() -> Iterator[list[str]]:
    """Hold back what native code prints on stderr (LiteRT logs every accelerator it probes).

    The lines are collected in the yielded list, so a failure can quote them; EDGERT_DEBUG=1
    lets them through.
    """
    captured: list[str] = []
    if os.environ.get("EDGERT_DEBUG"):
        yield captured
        return
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.extend(sink.read().decode("utf-8", errors="replace").splitlines())
