"""A GGUF model loaded in llama.cpp through llama-cpp-python's low-level API.

The decode loop is ours (``batch``): one ``llama_decode`` per step for every active
sequence, llama.cpp's sampler chain picks the tokens (plain greedy: an argmax of the logits row
in place), so no logits array is copied into Python.
Each sequence remembers the tokens in its KV cache and the next call evaluates only what
differs (prefix reuse). Quality scoring (``logit_rows``) runs in a second context, made on first
use, that returns every position's logits.
"""

from __future__ import annotations

import ctypes
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime.backends.base import (
    CancelToken,
    ModelInfo,
    SamplingParams,
    Settings,
    TokenEvent,
    check_logit_bias,
    check_prompt,
    default_threads,
)
from edge_runtime.backends.constraints import GrammarCompiler
from edge_runtime.backends.llamacpp import native
from edge_runtime.backends.llamacpp.batch import BatchScheduler, LlamaCppSlot
from edge_runtime.backends.llamacpp.disk_prefixes import DiskPrefixes
from edge_runtime.backends.slots import SlotPool
from edge_runtime.errors import GenerationError

if TYPE_CHECKING:
    import numpy as np

    from edge_runtime.formats.gguf_header import GGUFHeader
    from edge_runtime.models.prompt_cache import PromptCacheStore


def describe(native_model: native.NativeModel, header: GGUFHeader, path: str | Path, n_ctx: int, *,
             chat_template: str | None) -> ModelInfo:
    """The ``ModelInfo`` of a loaded GGUF (its header read by us, the rest as llama.cpp reports it),
    for the chat model and the embedding engine alike."""
    vocab = native_model.vocab
    bos, eos = native.special_tokens(vocab)
    n_ctx_train, n_params, _ = native.model_counts(native_model)
    return ModelInfo(
        name=header.get("general.name") or Path(path).stem,
        arch=header.architecture,
        quant=header.file_type_name,
        n_ctx_train=n_ctx_train,
        n_ctx=n_ctx,
        n_vocab=native.vocab_size(vocab),
        n_params=n_params,
        size_bytes=Path(path).stat().st_size,
        chat_template=chat_template,
        bos_token=native.token_text(vocab, bos),
        eos_token=native.token_text(vocab, eos),
        add_bos=native.vocab_add_bos(vocab),
    )


class LlamaCppModel:
    """A GGUF model loaded in llama.cpp, with one context and its KV cache."""

    def __init__(self, path: str, settings: Settings) -> None:
        from edge_runtime.formats.gguf import read_gguf_header

        # Our own bounds-checked read first: llama.cpp aborts the process on some bad files.
        header = read_gguf_header(path)
        self.native_model = native.NativeModel(str(path), settings)
        try:
            n_ctx_train = native.model_counts(self.native_model)[0]
            n_ctx = min(settings.n_ctx, n_ctx_train) if settings.n_ctx > 0 else n_ctx_train
            self.settings = Settings.from_dict({**settings.to_dict(), "n_ctx": n_ctx})
            self.n_threads = settings.n_threads or default_threads()
            self.context = native.NativeContext(self.native_model, self.settings, self.n_threads)
        except BaseException:
            self.native_model.close()
            raise
        self.info = describe(self.native_model, header, path, n_ctx, chat_template=self.native_model.chat_template())
        self.path = str(path)
        self.n_swa = native.model_n_swa(self.native_model)
        self.recurrent = native.model_has_recurrent_state(self.native_model)
        self.piece_buffer = ctypes.create_string_buffer(256)  # scheduler thread only
        self.evaluated_total = 0  # prompt + generated tokens evaluated since load
        self.slots = SlotPool([LlamaCppSlot(self, i) for i in range(self.settings.n_parallel)])
        self.grammars = GrammarCompiler(self._grammar_tokenizer, self.info.n_vocab)
        self.disk: DiskPrefixes | None = None  # the prompt cache on disk, once ``use_prompt_cache`` set it
        self.scheduler: BatchScheduler | None = BatchScheduler(self)
        self._scoring: native.ScoringContext | None = None
        self._scoring_lock = threading.Lock()

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        return self.native_model.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.native_model.detokenize(tokens)

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.info.n_vocab:
            return b""
        # A buffer of its own: the scheduler thread uses ``piece_buffer``.
        return self.native_model.token_to_piece(token, ctypes.create_string_buffer(64), special=True)

    def _grammar_tokenizer(self) -> Any:
        """llguidance's view of this vocabulary, every end-of-generation id as its EOS (it keeps a
        pointer to the vocabulary: ``close`` drops it before the model)."""
        from llguidance.llamacpp import lltokenizer_from_vocab

        vocab = self.native_model.vocab
        ends = [t for t in range(self.info.n_vocab) if native.is_end_of_generation(vocab, t)]
        with warnings.catch_warnings():  # llguidance reads each token's attributes through a deprecated alias
            warnings.simplefilter("ignore", DeprecationWarning)
            return lltokenizer_from_vocab(vocab, eos_token=ends)

    # -- generation ------------------------------------------------------------------------

    def check_prompt(self, tokens: Sequence[int]) -> list[int]:
        """The prompt as a list; see ``base.check_prompt`` for what raises."""
        return check_prompt(tokens, self.info)

    def check_params(self, params: SamplingParams) -> Any:
        """The compiled grammar of ``params`` (None when unconstrained); a ``logit_bias`` token
        outside the vocabulary or a grammar llguidance refuses raises here, before any work."""
        check_logit_bias(params, self.info)
        return self.grammars.compile(params)

    def generate(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        *,
        cancel: CancelToken | None = None,
    ) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens``, reusing whatever prefix the cache already holds.

        A prompt that is empty or does not fit the context, or parameters ``check_params``
        refuses, raise here, before any streaming. With several slots, this takes the free slot
        whose cache fits the prompt best.
        """
        tokens = self.check_prompt(tokens)
        self.check_params(params)
        return self.slots.generate(tokens, params, cancel)

    def acquire_slot(self, prompt: Sequence[int] | None = None,
                     timeout: float | None = None) -> AbstractContextManager[LlamaCppSlot]:
        """A free slot, preferring the one whose cache shares most with ``prompt`` (waits up to
        ``timeout`` seconds)."""
        return self.slots.acquire(prompt, timeout)

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate ``tokens`` from position 0 and yield (position, logit rows) from ``first`` on.

        For quality measurement, in a scoring context of its own (made on first use, freed by
        ``close``): the slots' caches are left as they are.
        """
        return self._score(self.check_prompt(tokens), first)

    def _score(self, tokens: list[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        if not self._scoring_lock.acquire(blocking=False):  # one context: one pass at a time
            raise GenerationError("this model is already scoring", "finish the other pass first")
        try:
            if self.scheduler is None:
                raise GenerationError("the model is closed")
            if self._scoring is None:
                self._scoring = native.ScoringContext(self.native_model, self.info.n_ctx, self.n_threads,
                                                      self.settings.n_threads_batch or self.n_threads,
                                                      self.settings.type_k, self.settings.type_v)
            yield from self._scoring.logit_rows(tokens, first)
        finally:
            self._scoring_lock.release()

    def use_prompt_cache(self, store: PromptCacheStore | None) -> None:
        """Save evaluated prefixes to ``store`` after each answer and restore them from it (None: stop).

        The artifact's sha256 keys the entries: taken from the record ``open_artifact`` keeps (a
        file never hashed before is hashed once, here, and remembered).
        """
        from edge_runtime.models.trust import recorded_sha256

        disk = None
        if store is not None:
            disk = DiskPrefixes(store, recorded_sha256(Path(self.path)), self.settings, native.library_version(),
                                whole_states_only=self.n_swa > 0 or self.recurrent)
        # Swapped between scheduler steps: a step in progress keeps the one it read.
        with self.scheduler.context_lock if self.scheduler is not None else nullcontext():
            old, self.disk = self.disk, disk
        if old is not None:
            old.close()

    def reset(self) -> None:
        """Forget the cache of every idle slot (their next call evaluates the whole prompt)."""
        if self.scheduler is None:
            return
        with self.scheduler.context_lock, self.slots.idle() as idle:
            for slot in idle:
                self.context.seq_clear(slot.seq.seq_id)
                slot.prefix.tokens.clear()

    def close(self) -> None:
        """Stop the scheduler, free the contexts and the model; safe to call twice."""
        self.slots.close()
        if self.scheduler is not None:
            self.scheduler.stop()
            self.scheduler = None
        if self._scoring is not None:
            self._scoring.close()
        if self.disk is not None:  # after the scheduler: its last saves are in the writer's hands
            self.disk.close()
            self.disk = None
        self.grammars.close()  # before the vocabulary its tokenizer points into
        self.context.close()
        self.native_model.close()

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
