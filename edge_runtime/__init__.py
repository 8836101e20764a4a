"""edge-runtime: run language models on small machines, offline.

The public API is small: ``load()`` a model, chat with it through a ``Session``, or stream from
``Model.generate``. Heavy runtimes are imported only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "Session", "SamplingParams", "Settings", "CancelToken", "__version__"]

if TYPE_CHECKING:
    from .backends.base import CancelToken, Model, SamplingParams, Settings
    from .session import Session


def load(model: str | None = None, settings: Settings | None = None, *, backend: str = "llama.cpp") -> Model:
    """Load a model by path or name (default: the embedded SmolLM2) on a backend."""
    from .backends import load_backend
    from .backends.base import Settings
    from .store import resolve_model

    path = resolve_model(model)
    return load_backend(backend).load(str(path), settings or Settings())


def __getattr__(name: str) -> object:
    # Lazy re-exports: `import edge_runtime` stays cheap for the CLI's --help.
    if name == "Session":
        from .session import Session

        return Session
    if name in ("SamplingParams", "Settings", "CancelToken"):
        from .backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
