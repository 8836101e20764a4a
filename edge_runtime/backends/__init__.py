"""The backend registry: cheap descriptors, so listing or planning never imports a runtime.

A backend's runtime is imported only by ``probe`` (which ``device`` and ``plan`` call) and by
``load_backend`` (when a model is actually loaded).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_runtime.backends.base import Availability, Backend, Embedder, Model, Settings
from edge_runtime.errors import BackendUnavailableError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    from edge_runtime.models.artifact import Artifact


@dataclass(frozen=True)
class BackendSpec:
    """How to find a backend without importing it."""

    name: str
    formats: tuple[str, ...]
    probe: str  # "module:function" returning Availability
    loader: str  # "module:Class" implementing Backend
    extra: str | None  # the pip extra that installs its runtime
    # "module:function(path, *, n_ctx, n_parallel) -> MemoryEstimate" for formats the GGUF
    # header estimate cannot read; None for GGUF (the planner reads the header itself).
    estimator: str | None = None

    @property
    def install_hint(self) -> str | None:
        """The pip command that installs this backend's runtime."""
        return f'pip install "edge-runtime[{self.extra}]"' if self.extra else None


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec(
        name="llama.cpp",
        formats=("gguf",),
        probe="edge_runtime.backends.llamacpp:probe",
        loader="edge_runtime.backends.llamacpp:LlamaCppBackend",
        extra=None,
    ),
    BackendSpec(
        name="onnx",
        formats=("onnx",),
        probe="edge_runtime.backends.onnx:probe",
        loader="edge_runtime.backends.onnx:OnnxBackend",
        extra="onnx",
        estimator="edge_runtime.backends.onnx:estimate_memory",
    ),
    BackendSpec(
        name="tflite",
        formats=("tflite",),
        probe="edge_runtime.backends.tflite:probe",
        loader="edge_runtime.backends.tflite:TfliteBackend",
        extra="tflite",
        estimator="edge_runtime.backends.tflite:estimate_memory",
    ),
)


def resolve(target: str) -> object:
    """Import ``"module:attribute"`` and return the attribute."""
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def backend_spec(name: str) -> BackendSpec:
    """The spec registered under ``name``; raises a user error naming the known ones."""
    for spec in BACKENDS:
        if spec.name == name:
            return spec
    known = ", ".join(s.name for s in BACKENDS)
    raise BackendUnavailableError(f"unknown backend {name!r}", f"choose one of: {known}")


def probe(name: str) -> Availability:
    """Ask one backend whether it can run here; never raises for a missing runtime."""
    spec = backend_spec(name)
    try:
        return resolve(spec.probe)()  # type: ignore[operator]
    except ImportError as exc:
        return Availability(name=name, available=False, reason=str(exc), install_hint=spec.install_hint)


def load_backend(name: str) -> type[Backend]:
    """Import and return the backend class, or say which extra installs it."""
    spec = backend_spec(name)
    try:
        return resolve(spec.loader)  # type: ignore[return-value]
    except ImportError as exc:
        raise BackendUnavailableError(f"the {name} backend cannot be imported: {exc}", spec.install_hint) from exc


def load_artifact(artifacts: Sequence[Artifact], settings: Settings, *, backend: str | None = None,
                  what: str | None = None) -> Model:
    """Load the first of ``artifacts`` that ``backend`` runs (without one: the first artifact on the
    backend of its format). ``what`` names the model in the error when none fits."""
    if backend is None:
        backend = next(s.name for s in BACKENDS if artifacts[0].format in s.formats)
    formats = backend_spec(backend).formats
    artifact = next((a for a in artifacts if a.format in formats), None)
    if artifact is None:
        raise ModelNotFoundError(f"{what or 'the default model'} has no artifact for the {backend} backend")
    return open_artifact(artifact, settings, backend=backend)


def open_artifact(artifact: Artifact, settings: Settings, *, backend: str | None = None) -> Model:
    """Load one planned artifact: the one way the product opens a model file.

    Its files are checked first (the manifest's sha256, links out of its folder) and a file never
    loaded cleanly before is tried in a child process (``trial_load``), so a file that would abort
    the runtime is an error here instead of the end of this process.
    """
    from edge_runtime.backends.trial_load import vet_artifact

    backend = backend or next(s.name for s in BACKENDS if artifact.format in s.formats)
    vet_artifact(artifact, backend)
    return load_backend(backend).load(artifact.path, settings)


def open_embedder(artifact: Artifact, settings: Settings, *, beside: Model | None = None) -> Embedder:
    """Load one artifact as an embedding engine (llama.cpp's: a GGUF), checked as ``open_artifact``
    checks it; a chat model ``beside`` it from the same file lends its weights."""
    from edge_runtime.backends.trial_load import vet_artifact

    if artifact.format != "gguf":
        raise UnsupportedModelError(f"{artifact.label} is a {artifact.format} model; embeddings need a GGUF file",
                                    "name a .gguf model (llama.cpp computes the embeddings)")
    vet_artifact(artifact, "llama.cpp", embeddings=True)
    return load_backend("llama.cpp").load_embedder(artifact.path, settings, beside=beside)  # type: ignore[attr-defined]
