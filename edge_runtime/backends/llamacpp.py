"""GGUF models through llama-cpp-python's low-level API.

The decode loop is ours: one ``llama_decode`` per step, llama.cpp's sampler chain picks the token,
so no logits array crosses into Python. Each sequence remembers the tokens in its KV cache and the
next call evaluates only what differs (prefix reuse).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import ClassVar

from ..errors import ContextLengthExceededError, EdgeRuntimeError, GenerationError
from . import _llama_native as native
from .base import (
    Availability,
    CancelToken,
    EvaluatedPrefix,
    GenerationStats,
    ModelInfo,
    SamplingParams,
    Settings,
    TokenEvent,
)
from .text import StreamingText


def probe() -> Availability:
    """What this llama.cpp build can do here (imports llama_cpp, loads no model)."""
    native.ensure_initialized()
    gpu = native.supports_gpu_offload()
    return Availability(
        name=LlamaCppBackend.name,
        available=True,
        version=native.library_version(),
        devices=("CPU", "GPU") if gpu else ("CPU",),
        gpu_offload=gpu,
    )


def default_threads() -> int:
    """Physical cores: llama.cpp's decode is memory-bound and SMT siblings only contend."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


class LlamaCppBackend:
    """Loads GGUF files."""

    name: ClassVar[str] = "llama.cpp"
    formats: ClassVar[tuple[str, ...]] = ("gguf",)

    @classmethod
    def availability(cls) -> Availability:
        return probe()

    @classmethod
    def load(cls, path: str, settings: Settings) -> LlamaCppModel:
        return LlamaCppModel(path, settings)


class _Sequence:
    """One sequence id in the shared context and what its KV cache holds."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.prefix = EvaluatedPrefix()


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp, with one context and its KV cache."""

    def __init__(self, path: str, settings: Settings) -> None:
        from ..gguf_file import read_gguf_header

        # Our own bounds-checked read first: llama.cpp aborts the process on some bad files.
        header = read_gguf_header(path)
        self._native_model = native.NativeModel(str(path), settings)
        try:
            n_ctx_train, n_params, size = native.model_counts(self._native_model)
            n_ctx = min(settings.n_ctx, n_ctx_train) if settings.n_ctx > 0 else n_ctx_train
            self.settings = Settings.from_dict({**settings.to_dict(), "n_ctx": n_ctx})
            self.n_threads = settings.n_threads or default_threads()
            self._ctx = native.NativeContext(self._native_model, self.settings, self.n_threads)
        except BaseException:
            self._native_model.close()
            raise
        vocab = self._native_model.vocab
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
            chat_template=self._native_model.chat_template(),
            bos_token=native.token_text(vocab, bos),
            eos_token=native.token_text(vocab, eos),
            add_bos=native.vocab_add_bos(vocab),
        )
        self.path = str(path)
        self._n_swa = native.model_n_swa(self._native_model)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._sequences = [_Sequence(i) for i in range(self.settings.n_parallel)]
        self._busy = threading.Lock()
        self.evaluated_total = 0  # prompt + generated tokens evaluated since load

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        return self._native_model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._native_model.detokenize(tokens)

    # -- generation ------------------------------------------------------------------------

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens``, reusing whatever prefix the cache already holds.

        A prompt that is empty or does not fit the context raises here, before any streaming.
        """
        tokens = list(tokens)
        if not tokens:
            raise EdgeRuntimeError("the prompt is empty", "give the model at least one token")
        if len(tokens) >= self.settings.n_ctx:
            raise ContextLengthExceededError(len(tokens), self.settings.n_ctx)
        return self._generate(self._sequences[0], tokens, params, cancel)

    def _generate(
        self,
        seq: _Sequence,
        tokens: list[int],
        params: SamplingParams,
        cancel: CancelToken | None,
    ) -> Iterator[TokenEvent]:
        if not self._busy.acquire(blocking=False):
            raise GenerationError("this model is already generating", "wait for the answer in progress")
        try:
            yield from self._run(seq, tokens, params, cancel)
        finally:
            self._busy.release()

    def _run(
        self, seq: _Sequence, tokens: list[int], params: SamplingParams, cancel: CancelToken | None
    ) -> Iterator[TokenEvent]:
        start = time.perf_counter()
        kept = self._reuse_prefix(seq, tokens)
        self._evaluate(seq, tokens[kept:], kept, cancel)
        prefill_end = time.perf_counter()
        if cancel is not None and cancel.cancelled:
            stats = GenerationStats(len(tokens), kept, len(tokens) - kept, 0, 0.0, prefill_end - start, 0.0)
            yield TokenEvent(None, "", "cancelled", stats)
            return
        sampler = native.Sampler(params, self.info.n_vocab)
        text = StreamingText(params.stop)
        vocab, ctx, pos, n_ctx = self._native_model.vocab, self._ctx, len(tokens), self.settings.n_ctx
        n_gen, first_token_at, finish = 0, 0.0, "length"
        try:
            if sampler.uses_history:
                sampler.accept(tokens[-params.repeat_last_n :])
            while True:
                token = ctx.sample(sampler, -1)
                if native.is_end_of_generation(vocab, token):
                    finish = "stop"
                    break
                n_gen += 1
                if n_gen == 1:
                    first_token_at = time.perf_counter()
                piece = text.push(self._native_model.token_to_piece(token, self._piece_buf))
                if text.stopped:
                    finish = "stop"
                    if piece:
                        yield TokenEvent(token, piece)
                    break
                if n_gen >= params.max_tokens or pos + 1 >= n_ctx:
                    finish = "length"
                    yield TokenEvent(token, piece)
                    break
                yield TokenEvent(token, piece)
                if cancel is not None and cancel.cancelled:
                    finish = "cancelled"
                    break
                self._decode_one(seq, token, pos)
                pos += 1
        finally:
            sampler.close()
        end = time.perf_counter()
        stats = GenerationStats(
            prompt_tokens=len(tokens),
            cached_tokens=kept,
            evaluated_tokens=len(tokens) - kept,
            gen_tokens=n_gen,
            ttft_s=(first_token_at or end) - start,
            prefill_s=prefill_end - start,
            decode_s=end - first_token_at if n_gen else 0.0,
        )
        yield TokenEvent(None, text.flush(), finish, stats)

    def _reuse_prefix(self, seq: _Sequence, tokens: list[int]) -> int:
        """Trim the sequence's cache to the prefix it shares with ``tokens``; return its length."""
        kept = seq.prefix.common_length(tokens)
        # The last prompt token is always evaluated again: its logits pick the first new token.
        kept = min(kept, len(tokens) - 1)
        if kept > 0:
            # A sliding-window cache forgets old positions as it goes. If the window the next
            # token must attend to is already gone, this prefix cannot be served from the cache.
            pos_min = self._ctx.seq_pos_min(seq.seq_id)
            if pos_min < 0 or pos_min > max(0, kept - max(1, self._n_swa)):
                kept = 0
        if 0 < kept < len(seq.prefix.tokens) and not self._ctx.seq_remove(seq.seq_id, kept):
            kept = 0  # a cache that cannot be cut mid-way (recurrent state): start over
        if kept == 0:
            self._ctx.seq_clear(seq.seq_id)
        del seq.prefix.tokens[kept:]
        return kept

    def _evaluate(self, seq: _Sequence, new: list[int], start_pos: int, cancel: CancelToken | None) -> None:
        """Prefill ``new`` at ``start_pos..`` in batches; logits only for the last token."""
        n_batch = self._ctx.n_batch
        for offset in range(0, len(new), n_batch):
            if cancel is not None and cancel.cancelled:
                return
            chunk = new[offset : offset + n_batch]
            last = offset + len(chunk) == len(new)
            entries = [
                (t, start_pos + offset + i, seq.seq_id, last and i == len(chunk) - 1)
                for i, t in enumerate(chunk)
            ]
            self._decode_entries(seq, entries, chunk)

    def _decode_one(self, seq: _Sequence, token: int, pos: int) -> None:
        self._decode_entries(seq, ((token, pos, seq.seq_id, True),), (token,))

    def _decode_entries(self, seq: _Sequence, entries: Sequence[tuple[int, int, int, bool]], tokens: Sequence[int]) -> None:
        try:
            self._ctx.decode(entries)
        except GenerationError:
            # The cache may hold part of the batch now: forget the sequence rather than trust it.
            self._ctx.seq_clear(seq.seq_id)
            seq.prefix.tokens.clear()
            raise
        seq.prefix.tokens.extend(tokens)
        self.evaluated_total += len(tokens)

    def reset(self) -> None:
        """Forget every sequence's cache (the next call evaluates its whole prompt)."""
        for seq in self._sequences:
            self._ctx.seq_clear(seq.seq_id)
            seq.prefix.tokens.clear()

    def close(self) -> None:
        """Free the context and the model; safe to call twice."""
        self._ctx.close()
        self._native_model.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
