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


def load(model: str | None = None, settings: Settings | None = None, *, backend: str | None = None) -> Model:
    """Load a model by path or name (default: the embedded SmolLM2).

    Without ``backend`` the first artifact decides (a .gguf runs on llama.cpp, an ONNX folder on
    onnx, a .tflite on tflite); with it, the first artifact in that backend's format is loaded.
    For the device-aware choice among several artifacts, use the planner (``edgert plan``).
    """
    from .backends import BACKENDS, backend_spec, load_backend
    from .backends.base import Settings
    from .errors import ModelNotFoundError
    from .model_spec import find_artifacts

    artifacts = find_artifacts(model)
    if backend is None:
        backend = next(s.name for s in BACKENDS if artifacts[0].format in s.formats)
    formats = backend_spec(backend).formats
    artifact = next((a for a in artifacts if a.format in formats), None)
    if artifact is None:
        raise ModelNotFoundError(f"{model or 'the default model'} has no artifact for the {backend} backend")
    return load_backend(backend).load(artifact.path, settings or Settings())


def __getattr__(name: str) -> object:
    # Lazy re-exports: `import edge_runtime` stays cheap for the CLI's --help.
    if name == "Session":
        from .session import Session

        return Session
    if name in ("SamplingParams", "Settings", "CancelToken"):
        from .backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
