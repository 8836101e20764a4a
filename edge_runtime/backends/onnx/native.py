"""The raw onnxruntime-genai calls of the ONNX backend.

Only this module and ``probe`` import ``onnxruntime_genai``. Runtime failures come out as our
typed errors with one-line messages.

Tokens are picked in numpy (``backends.sampling``) rather than by genai's search: a genai
``Generator`` fixes its search options (and its random generator) when it is created and ignores
later changes, yet the KV cache lives in that generator, so keeping the cache across calls with
different ``SamplingParams`` or seeds needs sampling outside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_runtime.errors import GenerationError, InvalidModelFileError, ModelLoadError

# genai_config provider names of the execution providers onnxruntime lists as available.
PROVIDER_NAMES = {
    "CUDAExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
    "CoreMLExecutionProvider": "coreml",
    "QNNExecutionProvider": "qnn",
    "OpenVINOExecutionProvider": "openvino",
    "WebGpuExecutionProvider": "webgpu",
}
GPU_PROVIDERS = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider")
PREFILL_CHUNK = 128  # prompt tokens evaluated per genai call (bounds the logits buffer)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # onnxruntime prefixes its messages with the C++ source location: noise for a user.
    text = re.sub(r"[\w./-]+\.(?:cc|cpp|h):\d+ [^(]*\([^)]*\)\s*", " ", text.splitlines()[0])
    return text[:400]


def load_model(folder: str, *, n_threads: int, provider: str | None) -> Any:
    """An ``og.Model`` for ``folder`` on ``provider`` (None: CPU) with ``n_threads`` threads."""
    import onnxruntime_genai as og

    try:
        config = og.Config(folder)
        # Threads are per session: intra-op runs one operator's work in parallel; inter-op
        # parallelism only helps branching graphs, which a decoder is not.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": n_threads, "inter_op_num_threads": 1}}}}))
        config.clear_providers()
        if provider is not None:
            config.append_provider(provider)
        return og.Model(config)
    except UnicodeDecodeError:  # onnxruntime's error quoted bytes of the graph that are not UTF-8
        raise InvalidModelFileError(f"{folder}: the ONNX model is damaged (onnxruntime refused it with a "
                                    "message that is not text)", "convert the model again") from None
    except RuntimeError as exc:
        why = _first_line(exc)
        if "protobuf" in why.lower() or "parsing" in why.lower() or "external data" in why.lower():
            raise InvalidModelFileError(f"{folder}: the ONNX model is damaged ({why})",
                                        "convert the model again") from None
        raise ModelLoadError(f"onnxruntime-genai could not load {folder}: {why}") from None


class GenaiSequence:
    """One genai ``Generator``: a KV cache of ``max_length`` positions and the tokens in it."""

    def __init__(self, model: Any, max_length: int) -> None:
        import onnxruntime_genai as og

        params = og.GeneratorParams(model)
        # Greedy search: genai only advances the cache; tokens are picked by our Sampler.
        params.set_search_options(max_length=max_length, do_sample=False, batch_size=1)
        try:
            self._generator = og.Generator(model, params)
        except RuntimeError as exc:
            raise GenerationError(f"onnxruntime-genai: {_first_line(exc)}") from None

    def rewind_to(self, n: int) -> None:
        """Keep only the first ``n`` positions of the cache."""
        try:
            self._generator.rewind_to(n)
        except RuntimeError as exc:
            raise GenerationError(f"onnxruntime-genai: {_first_line(exc)}") from None

    def append(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after what the cache holds (their logits become available)."""
        try:
            self._generator.append_tokens(np.asarray(tokens, dtype=np.int32))
        except RuntimeError as exc:
            raise GenerationError(f"onnxruntime-genai: {_first_line(exc)}") from None

    def appended_logits(self) -> np.ndarray:
        """The logits of every token of the last ``append``, float32, one row each."""
        logits = np.asarray(self._generator.get_output("logits"), dtype=np.float32)
        return logits.reshape(-1, logits.shape[-1])

    def last_logits(self) -> np.ndarray:
        """The logits after the last evaluated token, float32, one row."""
        logits = self._generator.get_logits()
        return np.asarray(logits, dtype=np.float32).reshape(-1, logits.shape[-1])[-1]
