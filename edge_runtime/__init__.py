"""edge-runtime: run language models on small machines, offline.

The public API is small: ``detect()`` the device, ``plan()`` what it should run, ``load()`` a
model, chat with it through a ``Session``, or stream from ``Model.generate``. Heavy runtimes are
imported only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["detect", "plan", "load", "Session", "SamplingParams", "Grammar", "Settings", "CancelToken", "__version__"]

if TYPE_CHECKING:
    from edge_runtime.backends.base import CancelToken, Grammar, Model, SamplingParams, Settings
    from edge_runtime.device.info import DeviceInfo
    from edge_runtime.planning.planner import Plan
    from edge_runtime.session import Session


def detect() -> DeviceInfo:
    """What this machine is: CPU and SIMD, memory, GPUs, board, thermal state, usable backends."""
    from edge_runtime.device import detect as detect_device

    return detect_device()


def plan(model: object = None, **options: object) -> Plan:
    """The backend, artifact and settings this device would run ``model`` with, and why.

    See ``edge_runtime.planning.plan`` for the options (backend, ctx, threads, parallel,
    n_gpu_layers, kv_cache_type, profile, device).
    """
    from edge_runtime.planning import plan as plan_model

    return plan_model(model, **options)  # type: ignore[arg-type]


def load(model: str | None = None, settings: Settings | None = None, *, backend: str | None = None,
         prompt_cache: bool = True) -> Model:
    """Load a model by path or name (default: the embedded SmolLM2).

    Without ``backend`` the first artifact decides (a .gguf runs on llama.cpp, an ONNX folder on
    onnx, a .tflite on tflite); with it, the first artifact in that backend's format is loaded.
    For the device-aware choice among several artifacts, use ``plan()``. With ``prompt_cache``
    (the default) a llama.cpp model writes the KV states of evaluated prompts, conversations
    included, under EDGERT_HOME (``prompt-cache/``, private to the user: folders 0700, files
    0600) and restores them in later processes; ``prompt_cache=False`` keeps it off (prefix reuse
    in memory stays); ``model.use_prompt_cache(store or None)`` changes it later.
    """
    from edge_runtime.backends import load_artifact
    from edge_runtime.backends.base import Settings
    from edge_runtime.models.prompt_cache import PromptCacheStore, attach
    from edge_runtime.models.spec import find_artifacts

    loaded = load_artifact(find_artifacts(model), settings or Settings(), backend=backend, what=model)
    if prompt_cache:
        attach(loaded, PromptCacheStore.default())
    return loaded


def __getattr__(name: str) -> object:
    # Lazy re-exports: `import edge_runtime` stays cheap for the CLI's --help.
    if name == "Session":
        from edge_runtime.session import Session

        return Session
    if name in ("SamplingParams", "Grammar", "Settings", "CancelToken"):
        from edge_runtime.backends import base

        return getattr(base, name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
