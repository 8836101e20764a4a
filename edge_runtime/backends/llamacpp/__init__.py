"""GGUF models on llama.cpp through llama-cpp-python's low-level API: the backend and its probe.

``native`` is the private ctypes layer, ``model.LlamaCppModel`` the loaded model and ``batch`` the
continuous-batching scheduler. Importing this package imports no runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from edge_runtime.backends.base import Availability, Settings

if TYPE_CHECKING:
    from edge_runtime.backends.llamacpp.model import LlamaCppModel


def probe() -> Availability:
    """What this llama.cpp build can do here (imports llama_cpp, loads no model)."""
    from edge_runtime.backends.llamacpp import native

    native.ensure_initialized()
    gpu = native.supports_gpu_offload()
    return Availability(
        name=LlamaCppBackend.name,
        available=True,
        version=native.library_version(),
        devices=("CPU", "GPU") if gpu else ("CPU",),
        gpu_offload=gpu,
    )


class LlamaCppBackend:
    """Loads GGUF files."""

    name: ClassVar[str] = "llama.cpp"
    formats: ClassVar[tuple[str, ...]] = ("gguf",)

    @classmethod
    def availability(cls) -> Availability:
        return probe()

    @classmethod
    def load(cls, path: str, settings: Settings) -> LlamaCppModel:
        from edge_runtime.backends.llamacpp.model import LlamaCppModel

        return LlamaCppModel(path, settings)
