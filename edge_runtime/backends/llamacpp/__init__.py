"""GGUF models on llama.cpp through llama-cpp-python's low-level API: the backend, its probe, the
quantizer and the writer of reference continuations.

``native`` is the private ctypes layer, ``model.LlamaCppModel`` the loaded model and ``batch`` the
continuous-batching scheduler. Importing this package imports no runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edge_runtime.backends.base import Availability, Settings

if TYPE_CHECKING:
    from edge_runtime.backends.llamacpp.embeddings import LlamaCppEmbedder
    from edge_runtime.backends.llamacpp.model import LlamaCppModel
    from edge_runtime.backends.llamacpp.remote import RemoteModel


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


def build_info() -> dict[str, Any]:
    """How this llama.cpp was built (imports llama_cpp, loads no model): its version, the CPU
    features its kernels use, GPU backends, BLAS, OpenMP and whether it can offload."""
    from edge_runtime.backends.llamacpp import native

    native.ensure_initialized()
    text = native.system_info()
    return {"version": native.library_version(), "system_info": text, **parse_system_info(text),
            "gpu_offload": native.supports_gpu_offload()}


def parse_system_info(text: str) -> dict[str, Any]:
    """llama.cpp's system info ("CUDA : ARCHS = 860 | CPU : AVX2 = 1 | OPENMP = 1 | ...") as facts."""
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for part in (p.strip() for p in text.split("|")):
        if " : " in part:
            current, _, part = part.partition(" : ")
            current = current.strip()
            sections.setdefault(current, {})
        key, sep, value = part.partition("=")
        if sep and current:
            sections[current][key.strip()] = value.strip()
    cpu = sections.get("CPU", {})
    return {
        "cpu_features": [k for k, v in cpu.items() if v == "1" and k not in ("OPENMP", "REPACK", "LLAMAFILE")],
        "openmp": cpu.get("OPENMP") == "1",
        "blas": any("BLAS" in name for name in sections) or any("BLAS" in k and v == "1" for k, v in cpu.items()),
        "gpu_backends": [name for name in sections if name != "CPU" and "BLAS" not in name],
    }


def quantize(src: str, dst: str, *, ftype: int, nthread: int, allow_requantize: bool) -> tuple[int, str]:
    """Write ``src`` as llama.cpp file type ``ftype`` (a ``LLAMA_FTYPE_*``) at ``dst``.

    One blocking native call that nothing in this process can interrupt (run it in a child
    process). llama.cpp's log goes to the ``edge_runtime.llama_cpp`` logger as it comes; returns
    llama.cpp's status (0: done) and the error lines it logged.
    """
    from edge_runtime.backends.llamacpp import native

    return native.quantize(src, dst, ftype=ftype, nthread=nthread, allow_requantize=allow_requantize)


def kernel_family() -> str:
    """Which arithmetic this llama.cpp runs here: its version and the CPU features its kernels use.

    Two machines with the same family compute the same logits bit for bit, so greedy text matches
    exactly; across families (AVX2 against NEON, a GPU build) a near-tie may flip.
    """
    from edge_runtime.backends.llamacpp import native

    return f"llama-cpp-python {native.library_version()} · {native.system_info()}"


def greedy_reference(path: str | Path, sha256: str | None, *, threads: int | None = None,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The reference document (``models.reference``) of the GGUF at ``path``: its greedy continuations.

    The one writer of references: ``edgert convert`` records it in a manifest for the unquantized
    artifact, ``scripts/write_embedded_references.py`` ships it for the embedded models.
    ``progress(done, total)`` is called before each prompt.
    """
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.models.reference import REFERENCE_CTX, REFERENCE_PROMPTS, REFERENCE_TOKENS

    params = SamplingParams(max_tokens=REFERENCE_TOKENS, temperature=0.0)
    rows = []
    with LlamaCppBackend.load(str(path), Settings(n_ctx=REFERENCE_CTX, n_threads=threads)) as model:
        for i, prompt in enumerate(REFERENCE_PROMPTS):
            if progress is not None:
                progress(i, len(REFERENCE_PROMPTS))
            model.reset()
            events = list(model.generate(model.tokenize(prompt, add_bos=model.info.add_bos), params))
            rows.append({"prompt": prompt, "continuation": "".join(e.text for e in events),
                         "tokens": [e.token for e in events if e.token is not None]})
        add_bos = model.info.add_bos
    return {"artifact": Path(path).name, "artifact_sha256": sha256, "sampling": "greedy",
            "max_tokens": REFERENCE_TOKENS, "add_bos": add_bos, "chat_template": False,
            "kernels": kernel_family(), "prompts": rows}


class LlamaCppBackend:
    """Loads GGUF files."""

    name: ClassVar[str] = "llama.cpp"
    formats: ClassVar[tuple[str, ...]] = ("gguf",)

    @classmethod
    def availability(cls) -> Availability:
        return probe()

    @classmethod
    def load(cls, path: str, settings: Settings) -> LlamaCppModel | RemoteModel:
        """The model in this process, or, split across RPC workers, in a child (``remote``)."""
        if settings.rpc_servers:
            from edge_runtime.backends.llamacpp.remote import RemoteModel

            return RemoteModel(path, settings)
        from edge_runtime.backends.llamacpp.model import LlamaCppModel

        return LlamaCppModel(path, settings)

    @classmethod
    def load_embedder(cls, path: str, settings: Settings, *, beside: object = None) -> LlamaCppEmbedder:
        """An embedding engine for the GGUF at ``path``; when ``beside`` is a chat model loaded here
        from the same file, it shares that model's weights (a second context, no second copy)."""
        import os

        from edge_runtime.backends.llamacpp.embeddings import LlamaCppEmbedder
        from edge_runtime.backends.llamacpp.model import LlamaCppModel

        if isinstance(beside, LlamaCppModel) and beside.native_model.ptr and os.path.samefile(beside.path, path):
            return LlamaCppEmbedder(path, settings, shared=beside.native_model)
        return LlamaCppEmbedder(path, settings)
