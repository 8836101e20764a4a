"""ONNX decoders through onnxruntime-genai: the backend, its availability and memory estimate.

The folder format is read by ``edge_runtime.formats.onnx`` (no runtime); the model
(``model.OnnxModel``) keeps one genai generator per slot, each remembering the tokens in its KV
cache. Importing this package imports no runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from edge_runtime.backends.base import Availability, MemoryEstimate, Settings
from edge_runtime.backends.onnx.native import PREFILL_CHUNK
from edge_runtime.formats.onnx import read_onnx_folder

if TYPE_CHECKING:
    from edge_runtime.backends.onnx.model import OnnxModel

MiB = 1 << 20
# Calibrated (x86-64 Linux, onnxruntime 1.32, onnxruntime-genai 0.18; SmolLM2-135M and the tiny
# test model, RSS measured around import, load and a 256-token generation):
# - importing onnxruntime_genai (~40 MiB) and a session's fixed part (~34 MiB);
# - what loading adds beyond the files' bytes, per precision: onnxruntime keeps prepacked
#   copies of the MatMul weights (fp32 ~40%, int8 ~8%, int4 ~34% of the file), and an int4
#   model whose embedding shares the LM head's 4-bit weights holds it as float32 too;
# - compute: a prefill chunk's logits plus a few MiB of activations.
OVERHEAD_BYTES = 75 * MiB
COMPUTE_BASE_BYTES = 8 * MiB
LOAD_FACTORS = {"fp32": 0.40, "fp16": 0.40, "bf16": 0.40, "int8": 0.08, "int4": 0.34}


def probe() -> Availability:
    """onnxruntime-genai's version and the execution providers onnxruntime offers here."""
    import onnxruntime
    import onnxruntime_genai

    from edge_runtime.backends.onnx.native import GPU_PROVIDERS

    providers = tuple(onnxruntime.get_available_providers())
    return Availability(
        name=OnnxBackend.name, available=True,
        version=f"{onnxruntime_genai.__version__} (onnxruntime {onnxruntime.__version__})",
        devices=tuple(p.removesuffix("ExecutionProvider") for p in providers if p != "AzureExecutionProvider"),
        gpu_offload=any(p in providers for p in GPU_PROVIDERS),
    )


def estimate_memory(path: str | Path, *, n_ctx: int, n_parallel: int = 1) -> MemoryEstimate:
    """RAM for loading the ONNX folder at ``path`` and generating with ``n_ctx`` per sequence.

    Weights: the graph and its data files (onnxruntime reads them into memory) plus the
    prepacked copies it makes at load. KV cache: what genai allocates per sequence, the whole
    ``n_ctx`` up front. Compute: a prefill chunk's logits and activations. Overhead: the runtime.
    """
    info = read_onnx_folder(path)
    n_ctx = min(n_ctx, info.max_length) if n_ctx > 0 else info.max_length
    files = info.weights_bytes
    weights = int(files * (1 + LOAD_FACTORS.get(info.precision or "", 0.40)))
    if info.embedding_quantized:
        weights += info.n_vocab * info.hidden_size * 4
    kv = info.kv_cache_bytes(n_ctx) * max(1, n_parallel)
    compute = COMPUTE_BASE_BYTES + PREFILL_CHUNK * (info.n_vocab + 8 * info.hidden_size) * 4 * max(1, n_parallel)
    return MemoryEstimate(weights_bytes=weights, kv_bytes=kv, compute_bytes=compute,
                          overhead_bytes=OVERHEAD_BYTES, total_bytes=weights + kv + compute + OVERHEAD_BYTES)


class OnnxBackend:
    """Loads ONNX folders written by onnxruntime-genai's model builder."""

    name: ClassVar[str] = "onnx"
    formats: ClassVar[tuple[str, ...]] = ("onnx",)

    @classmethod
    def availability(cls) -> Availability:
        return probe()

    @classmethod
    def load(cls, path: str, settings: Settings) -> OnnxModel:
        from edge_runtime.errors import BackendUnavailableError

        try:
            import onnxruntime_genai  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailableError(f"the onnx backend cannot be imported: {exc}",
                                          'pip install "edge-runtime[onnx]"') from None
        from edge_runtime.backends.onnx.model import OnnxModel

        return OnnxModel(path, settings)
