"""TFLite (LiteRT) decoders: the backend, its availability and memory estimate.

A TFLite artifact is one ``.tflite`` file written by ``converters/to_tflite.py`` (prefill and
decode signatures, the KV cache as inputs and outputs; read by ``edge_runtime.formats.tflite``) with the
tokenizer files and the converter's ``<file>.json`` beside it. The exported cache length is
the model's whole context: ``n_ctx_train`` and ``ModelInfo.n_ctx`` report it, and no setting
can raise it. The model itself is ``model.TfliteModel``; the runtime layer is
``engine``. Importing this module imports no runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from edge_runtime.backends.base import Availability, MemoryEstimate, Settings
from edge_runtime.formats.tflite import read_tflite_layout

if TYPE_CHECKING:
    from edge_runtime.backends.tflite.model import TfliteModel

MiB = 1 << 20
# Calibrated (x86-64 Linux, ai-edge-litert 2.3.0, 2 threads): resident memory a process gains by
# importing the runtime, loading and generating, measured with psutil against this estimate on the
# tiny test Llama and on SmolLM2-135M dynamic_int8 (KV 512 and 1024; see the issue-6 note):
# - the runtime itself (ai_edge_litert, tokenizers, the LiteRT environment): 56 MiB on a model
#   with almost no weights;
OVERHEAD_BYTES = 54 * MiB
# - weights: XNNPACK's packed copy, memory-mapped from its weight cache (about the size of the
#   file's buffers) plus the pages of the .tflite it still reads (embeddings, tables): 1.48-1.58x
#   the buffers with a warm cache (the first load, which writes the cache, adds about 0.25x);
WEIGHT_RESIDENT_FACTOR = 1.6
# - the KV cache twice: the engine's two buffer sets (read one, write the other);
KV_COPIES = 2
COMPUTE_BASE_BYTES = 4 * MiB
# The classic Interpreter (tflite-runtime, or ai-edge-litert without CompiledModel) packs the
# weights again for each signature and gives each its own input and output cache tensors:
# measured 1066 MiB for SmolLM2 KV 1024 where the CompiledModel engine needs 363 MiB.


def probe() -> Availability:
    """Which TFLite runtime is installed (ai-edge-litert preferred), its version; CPU via XNNPACK."""
    from edge_runtime.backends.tflite.engine import find_runtime

    runtime = find_runtime()  # ImportError -> the registry reports the extra to install
    api = "CompiledModel" if runtime.compiled_model else "Interpreter"
    return Availability(
        name=TfliteBackend.name, available=True, version=f"{runtime.package} {runtime.version}",
        reason=f"{api} API, XNNPACK on the CPU", devices=("CPU",), gpu_offload=False,
    )


def estimate_memory(path: str | Path, *, n_ctx: int, n_parallel: int = 1) -> MemoryEstimate:
    """RAM for loading the .tflite at ``path`` and generating (the runtime's import included).

    Weights: the file's buffers as XNNPACK's packed copy and the mapped file hold them. KV: the
    exported cache (every layer's K and V at the full exported length, whatever ``n_ctx`` is: the
    size is fixed at conversion) in the engine's two buffer sets. Compute: each prefill
    signature's logits buffer and the widest one's attention scores. The model holds one
    sequence, so ``n_parallel`` does not multiply the cache. Measured/estimated: 0.81-0.97 for
    SmolLM2-135M int8 with KV 1024 (prompts of 14 to 521 tokens: the estimate assumes every
    prefill length gets used), 0.95-0.99 with KV 512, 0.92 on a first load (which writes the
    weight cache), 0.94 for the tiny test model.
    """
    layout = read_tflite_layout(path)
    signatures = len(layout.prefill_lengths) + 1
    compiled = _runtime_has_compiled_model()
    weights = int(layout.weights_bytes * (WEIGHT_RESIDENT_FACTOR if compiled else 1 + signatures))
    kv = layout.kv_bytes * (KV_COPIES if compiled else 2 * signatures + 2)
    widest = max(layout.prefill_lengths or (1,))
    logits = sum(n * layout.n_vocab * 4 for n in (*layout.prefill_lengths, 1))
    # Attention scores of the widest prefill over the whole cache (assuming 4 query heads per
    # KV head, as in most grouped-query models).
    scores = widest * layout.kv_len * layout.kv_heads * 4 * 4
    compute = COMPUTE_BASE_BYTES + logits + scores
    total = weights + kv + compute + OVERHEAD_BYTES
    return MemoryEstimate(weights_bytes=weights, kv_bytes=kv, compute_bytes=compute,
                          overhead_bytes=OVERHEAD_BYTES, total_bytes=total)


def _runtime_has_compiled_model() -> bool:
    from edge_runtime.backends.tflite.engine import find_runtime

    try:
        return find_runtime().compiled_model
    except ImportError:
        return True  # nothing installed: the planner rejects the backend anyway


class TfliteBackend:
    """Loads .tflite decoders written by ``edgert convert --format tflite``."""

    name: ClassVar[str] = "tflite"
    formats: ClassVar[tuple[str, ...]] = ("tflite",)

    @classmethod
    def availability(cls) -> Availability:
        return probe()

    @classmethod
    def load(cls, path: str, settings: Settings) -> TfliteModel:
        from edge_runtime.backends.tflite.model import TfliteModel

        return TfliteModel(path, settings)
