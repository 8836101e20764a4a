"""Shared fixtures: the real embedded models on the real llama.cpp backend."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tiny_models"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def edgert_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the model store at a temporary folder for the whole run (never the user's own)."""
    home = tmp_path_factory.mktemp("edgert-home")
    os.environ["EDGERT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from edge_runtime.models.spec import resolve_model

    return resolve_model("smollm2")


@pytest.fixture(scope="session")
def gemma_path(edgert_home: Path) -> Path:
    from edge_runtime.models.spec import resolve_model

    return resolve_model("gemma3-270m")


@pytest.fixture(scope="session")
def smollm2(smollm2_path: Path):
    """One loaded SmolLM2 for the session: tests share it, as a server's requests would."""
    from edge_runtime.backends.base import Settings
    from edge_runtime.backends.llamacpp.model import LlamaCppModel

    model = LlamaCppModel(str(smollm2_path), Settings(n_ctx=2048, n_threads=2))
    yield model
    model.close()


@pytest.fixture(scope="session")
def prose() -> str:
    """English prose every Python installation carries (the Python documentation's topics)."""
    from edge_runtime.sample_text import python_docs_text

    text = python_docs_text()
    assert len(text) > 100_000, f"pydoc_data.topics holds only {len(text)} characters"
    return text


@pytest.fixture(scope="session")
def prose_file(tmp_path_factory: pytest.TempPathFactory, prose: str) -> Path:
    """The first 30k characters of that prose as a file, for commands that take --text FILE."""
    path = tmp_path_factory.mktemp("text") / "python-docs-slice.txt"
    path.write_text(prose[:30_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def edgert_cmd() -> list[str]:
    """The installed console script, run as a real process."""
    exe = Path(sys.executable).with_name("edgert")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_runtime.cli"]
