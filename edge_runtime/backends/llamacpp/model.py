"""A GGUF model loaded in llama.cpp through llama-cpp-python's low-level API.

The decode loop is ours (``batch``): one ``llama_decode`` per step for every active
sequence, llama.cpp's sampler chain picks the tokens, so no logits array crosses into Python.
Each sequence remembers the tokens in its KV cache and the next call evaluates only what
differs (prefix reuse).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path

from edge_runtime.backends.base import (
    CancelToken,
    ModelInfo,
    SamplingParams,
    Settings,
    TokenEvent,
    check_prompt,
    default_threads,
)
from edge_runtime.backends.llamacpp import native
from edge_runtime.backends.llamacpp.batch import BatchScheduler, SlotPool
from edge_runtime.errors import GenerationError


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp, with one context and its KV cache."""

    def __init__(self, path: str, settings: Settings) -> None:
        from edge_runtime.formats.gguf import read_gguf_header

        # Our own bounds-checked read first: llama.cpp aborts the process on some bad files.
        header = read_gguf_header(path)
        self.native_model = native.NativeModel(str(path), settings)
        try:
            n_ctx_train, n_params, size = native.model_counts(self.native_model)
            n_ctx = min(settings.n_ctx, n_ctx_train) if settings.n_ctx > 0 else n_ctx_train
            self.settings = Settings.from_dict({**settings.to_dict(), "n_ctx": n_ctx})
            self.n_threads = settings.n_threads or default_threads()
            self.context = native.NativeContext(self.native_model, self.settings, self.n_threads)
        except BaseException:
            self.native_model.close()
            raise
        vocab = self.native_model.vocab
        bos, eos = native.special_tokens(vocab)
        self.info = ModelInfo(
            name=header.get("general.name") or Path(path).stem,
            arch=header.architecture,
            quant=header.file_type_name,
            n_ctx_train=n_ctx_train,
            n_ctx=n_ctx,
            n_vocab=native.vocab_size(vocab),
            n_params=n_params,
            size_bytes=Path(path).stat().st_size,
            chat_template=self.native_model.chat_template(),
            bos_token=native.token_text(vocab, bos),
            eos_token=native.token_text(vocab, eos),
            add_bos=native.vocab_add_bos(vocab),
        )
        self.path = str(path)
        self.n_swa = native.model_n_swa(self.native_model)
        self.piece_buffer = ctypes.create_string_buffer(256)  # scheduler thread only
        self.evaluated_total = 0  # prompt + generated tokens evaluated since load
        self.slots = SlotPool(self, self.settings.n_parallel)
        self.scheduler: BatchScheduler | None = BatchScheduler(self)

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        return self.native_model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.native_model.detokenize(tokens)

    # -- generation ------------------------------------------------------------------------

    def check_prompt(self, tokens: Sequence[int]) -> list[int]:
        """The prompt as a list; see ``base.check_prompt`` for what raises."""
        return check_prompt(tokens, self.info)

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens``, reusing whatever prefix the cache already holds.

        A prompt that is empty or does not fit the context raises here, before any streaming.
        With several slots, this takes the free slot whose cache fits the prompt best.
        """
        tokens = self.check_prompt(tokens)
        if len(self.slots) == 1 and self.slots.n_free == 0:
            raise GenerationError("this model is already generating", "wait for the answer in progress")
        return self._generate_in_slot(tokens, params, cancel)

    def _generate_in_slot(
        self, tokens: list[int], params: SamplingParams, cancel: CancelToken | None
    ) -> Iterator[TokenEvent]:
        with self.slots.acquire(tokens) as slot:
            yield from slot.generate(tokens, params, cancel=cancel)

    def acquire_slot(self, prompt: Sequence[int] | None = None, timeout: float | None = None):
        """A context manager handing out a free ``Slot`` (waits up to ``timeout`` seconds)."""
        return self.slots.acquire(prompt, timeout)

    def reset(self) -> None:
        """Forget the cache of every idle slot (their next call evaluates the whole prompt)."""
        assert self.scheduler is not None, "the model is closed"
        with self.scheduler.context_lock:
            for slot in self.slots.idle_slots():
                self.context.seq_clear(slot.seq.seq_id)
                slot.seq.prefix.tokens.clear()

    def close(self) -> None:
        """Stop the scheduler, free the context and the model; safe to call twice."""
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        self.context.close()
        self.native_model.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
