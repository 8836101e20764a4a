"""The seams every backend implements: Backend, Model, and the plain data they exchange."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

# The parameters of a generation are seam data too; they live in their own module with their checks.
from edge_runtime.backends.params import Grammar as Grammar
from edge_runtime.backends.params import SamplingParams as SamplingParams
from edge_runtime.errors import ContextLengthExceededError, GenerationError, InvalidRequestError
from edge_runtime.models.prompt_cache import common_length

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here, and what it can do (cheap to compute, no model needed)."""

    name: str
    available: bool
    version: str | None = None
    reason: str | None = None  # why not available, or a note
    devices: tuple[str, ...] = ()  # "CPU", "CUDA", "Metal", execution providers ...
    gpu_offload: bool = False
    install_hint: str | None = None  # e.g. 'pip install "edge-runtime[onnx]"'

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "devices": list(self.devices)}


# ggml type ids of the KV cache types a plan may name (stable across llama.cpp releases).
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}


@dataclass(frozen=True)
class Settings:
    """How to load a model; keys follow llama-cpp-python's ``Llama()`` parameter names."""

    n_ctx: int = 2048
    n_threads: int | None = None  # None: physical cores
    n_threads_batch: int | None = None
    n_batch: int = 512
    n_ubatch: int = 512
    n_gpu_layers: int = 0
    flash_attn: bool = True
    type_k: str = "f16"
    type_v: str = "f16"
    use_mmap: bool = True
    n_parallel: int = 1  # sequences held at once (server slots)
    # llama.cpp RPC workers ("host:port") that hold the offloaded layers, and each one's share
    # of them (empty: by free memory); see backends/llamacpp/rpc.py.
    rpc_servers: tuple[str, ...] = ()
    tensor_split: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_llama_kwargs(self) -> dict[str, Any]:
        """The same settings as llama-cpp-python ``Llama()`` keyword arguments."""
        data = asdict(self)
        del data["n_parallel"], data["rpc_servers"]  # Llama() takes no workers: the plan lists them
        if self.tensor_split:
            data["tensor_split"] = list(self.tensor_split)
        else:
            del data["tensor_split"]
        data["type_k"] = KV_CACHE_TYPES[self.type_k]
        data["type_v"] = KV_CACHE_TYPES[self.type_v]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model adds to a process: RAM parts (`total_bytes` is their sum) and VRAM."""

    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    total_bytes: int
    vram_bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        """The plan's `memory` object; `vram_bytes` only when something is offloaded."""
        out = {
            "weights_bytes": self.weights_bytes,
            "kv_bytes": self.kv_bytes,
            "compute_bytes": self.compute_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
        }
        if self.vram_bytes:
            out["vram_bytes"] = self.vram_bytes
        return out


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model says about itself."""

    name: str
    arch: str
    quant: str | None
    n_ctx_train: int
    n_ctx: int
    n_vocab: int
    n_params: int
    size_bytes: int
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    add_bos: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class GenerationStats:
    """Counters and timings of one ``generate`` call, attached to its last event."""

    prompt_tokens: int  # tokens in the prompt
    cached_tokens: int  # prompt tokens found already evaluated (prefix reuse)
    evaluated_tokens: int  # prompt tokens evaluated by this call
    gen_tokens: int
    ttft_s: float  # call start to first generated token
    prefill_s: float
    decode_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.evaluated_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of prefill; decode speed counts the ones after it.
        n = self.gen_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "prefill_tok_s": self.prefill_tok_s,
            "decode_tok_s": self.decode_tok_s,
        }


@dataclass(frozen=True)
class TokenEvent:
    """One step of a generation stream.

    Every generated token gives one event with its decoded ``text`` (possibly empty while a
    UTF-8 sequence or a possible stop string is held back). The last event has ``finish_reason``
    set (``stop``, ``length`` or ``cancelled``) and carries ``stats``; its ``token`` is ``None``
    when nothing was generated in that step (end-of-generation token, stop string, cancel).
    """

    token: int | None
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    logprob: float | None = None  # with SamplingParams.logprobs: log-softmax of the raw logits
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Embeddings:
    """What ``Embedder.embed`` returns: one unit-length float32 row per input, and each one's tokens."""

    vectors: np.ndarray  # shape (inputs, dimensions)
    token_counts: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


class CancelToken:
    """Thread-safe flag a consumer sets to stop a generation between two tokens."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


class Slot(Protocol):
    """One sequence of a model (its own KV cache), held by one caller through ``Model.acquire_slot``."""

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> Iterator[TokenEvent]:
        """Exactly ``Model.generate``, on this slot's cache."""
        ...


class Model(Protocol):
    """A loaded model: what the session, the server, the bench and the converters call.

    ``generate`` owns the KV cache and reuses the evaluated prefix. A model holds
    ``Settings.n_parallel`` sequences (slots); ``generate`` takes a free one and, on a model of
    one slot, refuses a second stream while one runs rather than wait.
    """

    info: ModelInfo

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``: ``special`` parses control tokens written in it, ``add_bos``
        prepends BOS where the model's tokenizer adds one (llama.cpp's ``add_special``)."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``, control tokens included, so it tokenizes back to the same ids."""
        ...

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (logprobs' ``bytes``): a piece of a UTF-8 character stays that
        piece, a control token is its text; empty for an id outside the vocabulary."""
        ...

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens``; a bad prompt raises here, before any streaming."""
        ...

    def acquire_slot(self, prompt: Sequence[int] | None = None,
                     timeout: float | None = None) -> AbstractContextManager[Slot]:
        """A free slot, preferring the one whose cache shares most with ``prompt``; waits up to
        ``timeout`` seconds (None: forever), then raises ``SlotsBusyError``. Leaving the block
        stops whatever the slot still generates."""
        ...

    def reset(self) -> None:
        """Forget the cache of every idle slot (their next call evaluates the whole prompt)."""
        ...

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate ``tokens`` from position 0 and yield ``(position, rows)``: float32 logits, one
        row per position, of every position from ``first`` to the last, in order (for quality
        scoring). The slots' caches stay as they are, except where scoring runs on the model's
        only sequence (TFLite), whose cache then holds ``tokens``."""
        ...

    def close(self) -> None:
        """Free the runtime's memory; safe to call twice."""
        ...

    def __enter__(self) -> Model: ...

    def __exit__(self, *exc: object) -> None: ...


class Embedder(Protocol):
    """A loaded embedding model (llama.cpp's, ``backends.llamacpp.embeddings``): what the server's
    embedding routes and ``edgert embed`` call."""

    n_ctx: int  # most tokens one input may hold
    n_embd: int  # numbers in a vector
    pooling_name: str  # "mean", "cls" or "last"
    info: ModelInfo  # what the model says about itself (name, architecture, size)

    def embed(self, inputs: Sequence[str | Sequence[int]], *, dimensions: int | None = None,
              truncate: bool = False) -> Embeddings:
        """Unit vectors of ``inputs`` (texts or token lists) in order, in as few decodes as fit.

        ``dimensions`` (1 to ``n_embd``) keeps the first numbers and normalises again; an empty
        input, or one longer than ``n_ctx`` unless ``truncate`` cuts it, raises naming its index."""
        ...

    def close(self) -> None: ...


class Backend(Protocol):
    """A runtime that loads artifacts of some formats into ``Model``s."""

    name: ClassVar[str]
    formats: ClassVar[tuple[str, ...]]

    @classmethod
    def availability(cls) -> Availability: ...

    @classmethod
    def load(cls, path: str, settings: Settings) -> Model: ...


@dataclass
class EvaluatedPrefix:
    """Tokens whose keys and values sit in a sequence's KV cache, in order."""

    tokens: list[int] = field(default_factory=list)

    def common_length(self, tokens: Sequence[int]) -> int:
        return common_length(self.tokens, tokens)


def default_threads() -> int:
    """Physical cores, every backend's default: decoding is memory-bound and SMT siblings only
    contend."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def check_logit_bias(params: SamplingParams, info: ModelInfo) -> None:
    """Refuse a ``logit_bias`` naming a token outside the model's vocabulary."""
    bad = next((t for t in params.logit_bias or () if t >= info.n_vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"logit_bias names token {bad}, outside the vocabulary (0..{info.n_vocab - 1})")


def check_prompt(tokens: Sequence[int], info: ModelInfo, hint: str | None = None) -> list[int]:
    """The prompt as a list. An empty one, one that does not fit the context (``hint`` says what
    to do about that) or one with a token outside the vocabulary raises, before any work."""
    tokens = list(tokens)
    if not tokens:
        raise InvalidRequestError("the prompt is empty", "give the model at least one token")
    if len(tokens) >= info.n_ctx:
        raise ContextLengthExceededError(len(tokens), info.n_ctx, hint)
    bad = next((t for t in tokens if not 0 <= t < info.n_vocab), None)
    if bad is not None:
        raise InvalidRequestError(f"token {bad} is outside the vocabulary (0..{info.n_vocab - 1})")
    return tokens


def greedy_stats(model: Model, tokens: list[int], max_tokens: int = 1, *, reset: bool = True) -> GenerationStats:
    """The statistics of a greedy generation of ``max_tokens`` continuing ``tokens`` (from an
    empty cache with ``reset``), as the generation itself counts them."""
    if reset:
        model.reset()
    for event in model.generate(tokens, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        if event.stats is not None:
            return event.stats
    raise GenerationError("the generation ended without its statistics")


def first_token_s(model: Model, tokens: list[int], *, reset: bool = True) -> float:
    """The time to the first token of a one-token greedy generation of ``tokens`` (``greedy_stats``)."""
    return greedy_stats(model, tokens, reset=reset).ttft_s
