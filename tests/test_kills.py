"""SIGKILL at random moments while edgert writes (``benchmarks/kills.py`` at CI size): a conversion,
a store add and a chat's /save each leave no partial file, manifests that parse, and a rerun that
completes. Real `edgert` processes on the tiny test model."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
KILLS = 10


@pytest.fixture(scope="module")
def kills():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import kills as module
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_kills_leave_whole_files_and_reruns_complete(kills, tmp_path, edgert_cmd):
    lines: list[str] = []
    setup = kills.Setup(edgert=edgert_cmd[0], work=tmp_path, rng=random.Random(12), rerun_every=5,
                        env={**os.environ, "EDGERT_HOME": str(tmp_path / "home")}, log=lines.append)
    convert = kills.convert_kind(KILLS, setup)
    # The smallest sources: the tiny model's Q8_0 for the store and the chat (its load takes no time).
    tiny = next((tmp_path / "convert-out").glob("*-Q8_0.gguf"))
    add = kills.add_kind(KILLS, setup, gguf=tiny)
    save = kills.save_kind(KILLS, setup, model=str(tiny), n_messages=200)
    for tally in (convert, add, save):
        assert tally.problems == [], tally.line()
        assert tally.kills == KILLS, tally.line()
        assert tally.reruns == KILLS // setup.rerun_every, tally.line()
    assert save.states["whole save"] > 0, save.line()
