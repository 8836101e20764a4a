"""A TFLite decoder as a ``Model``: prefill in signature chunks, decode, sample in numpy.

The KV cache stays with the engine between calls, and the model remembers which tokens it holds
(``EvaluatedPrefix``): a new prompt evaluates only what differs from that prefix, from the first
differing position on, exactly as the llama.cpp backend does. Positions past the kept prefix
still hold old keys and values, but the causal mask hides every position after the one being
computed, and each is overwritten before a later token can see it.

One sequence per model, a pool of one slot: ``generate`` raises while another generation runs,
and ``acquire_slot`` (the server's entry) waits for the model to be free.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.base import (
    CancelToken,
    EvaluatedPrefix,
    GenerationStats,
    ModelInfo,
    SamplingParams,
    Settings,
    TokenEvent,
    check_logit_bias,
    check_prompt,
    default_threads,
)
from edge_runtime.backends.constraints import GrammarState, tokenizer_json_compiler
from edge_runtime.backends.sampling import Sampler
from edge_runtime.backends.slots import SlotPool, StreamGuard
from edge_runtime.backends.text import StreamingText
from edge_runtime.backends.tflite.engine import INSTALL_HINT, find_runtime, open_engine
from edge_runtime.backends.tokenizer import HFTokenizer
from edge_runtime.errors import BackendUnavailableError, GenerationError, InvalidModelFileError
from edge_runtime.formats.tflite import DECODE, PREFILL_PREFIX, read_description, read_tflite_layout


def plan_chunks(n_tokens: int, pos: int, lengths: Sequence[int], kv_len: int) -> list[tuple[str, int, int]]:
    """How to evaluate ``n_tokens`` starting at ``pos``: (signature, real tokens, width) steps.

    The largest prefill that the remaining tokens fill goes first; the tail goes in one padded
    call when a prefill at most twice its size covers it (one call costs less than several small
    ones), else in smaller chunks. A step never reaches past the cache (``pos + width <= kv_len``):
    the cache update would be clamped and overwrite earlier positions. A single token, or a tail
    no prefill fits, goes through ``decode``.
    """
    steps: list[tuple[str, int, int]] = []
    while n_tokens > 0:
        fits = [n for n in sorted(lengths) if pos + n <= kv_len]
        covering = [n for n in fits if n >= n_tokens]
        below = [n for n in fits if n <= n_tokens]
        if n_tokens == 1 or not fits:
            step = (DECODE, 1, 1)
        elif covering and covering[0] <= 2 * n_tokens:
            step = (f"{PREFILL_PREFIX}{covering[0]}", n_tokens, covering[0])
        elif below:
            step = (f"{PREFILL_PREFIX}{below[-1]}", below[-1], below[-1])
        else:
            step = (f"{PREFILL_PREFIX}{fits[0]}", n_tokens, fits[0])
        steps.append(step)
        n_tokens -= step[1]
        pos += step[1]
    return steps


class TfliteSlot:
    """The model's one sequence: the engine's KV cache and the tokens it holds."""

    def __init__(self, model: TfliteModel) -> None:
        self._model = model
        self.prefix = model.prefix
        self._guard = StreamGuard()

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Exactly ``Model.generate``, by the holder of the slot."""
        tokens = self._model.check_prompt(tokens)
        template = self._model.check_params(params)
        cancel = cancel or CancelToken()
        return self._guard.start(self._model._stream(tokens, params, template, cancel), cancel)

    def wait_idle(self) -> None:
        """Stop what the slot still generates (nobody is reading it) and wait until it has."""
        self._guard.wait_idle()


class TfliteModel:
    """A .tflite decoder loaded in LiteRT, with its tokenizer and KV cache."""

    def __init__(self, path: str, settings: Settings) -> None:
        self.path = str(path)
        self.layout = read_tflite_layout(path)  # our checks first: a bad file never reaches LiteRT
        description = read_description(path)
        try:
            runtime = find_runtime()
        except ImportError as exc:
            raise BackendUnavailableError(f"the tflite backend cannot run: {exc}", INSTALL_HINT) from None
        self.tokenizer = HFTokenizer(Path(path).parent, bos_id=description.get("bos_token_id"),
                                     eos_ids=description.get("eos_token_ids") or ())
        if self.tokenizer.n_vocab > self.layout.n_vocab:
            raise InvalidModelFileError(
                f"{Path(path).name}: the tokenizer beside it has {self.tokenizer.n_vocab} tokens, the model "
                f"{self.layout.n_vocab}; they do not belong together", "convert the model again")
        kv_len = self.layout.kv_len
        n_ctx = min(settings.n_ctx, kv_len) if settings.n_ctx > 0 else kv_len
        self.n_threads = settings.n_threads or default_threads()
        self.settings = Settings.from_dict({**settings.to_dict(), "n_ctx": n_ctx, "n_threads": self.n_threads,
                                            "n_threads_batch": self.n_threads, "n_gpu_layers": 0, "n_parallel": 1})
        self.runtime = runtime
        self.engine = open_engine(runtime, self.layout, self.n_threads)
        stem = Path(path).stem
        quant = description.get("quant")
        self.info = ModelInfo(
            name=stem[: -len(quant)].rstrip("-_.") if quant and stem.endswith(quant) else stem,
            arch=str(description.get("arch") or "unknown"), quant=quant, n_ctx_train=kv_len, n_ctx=n_ctx,
            n_vocab=self.layout.n_vocab, n_params=int(description.get("n_params") or 0),
            size_bytes=self.layout.size_bytes, chat_template=self.tokenizer.chat_template,
            bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token, add_bos=self.tokenizer.add_bos,
        )
        self.prefix = EvaluatedPrefix()
        self.slots = SlotPool([TfliteSlot(self)])
        self.grammars = tokenizer_json_compiler(self.tokenizer.path, self.info.n_vocab, self.tokenizer.end_ids)
        self.evaluated_total = 0

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.tokenizer.n_vocab:  # a padded head's extra rows have no token
            return b""
        raw = self.grammars.token_bytes(token)
        return raw if raw is not None else self.tokenizer.decode([token]).encode("utf-8")

    # -- generation ------------------------------------------------------------------------

    def check_prompt(self, tokens: Sequence[int]) -> list[int]:
        """The prompt as a list; see ``base.check_prompt`` for what raises."""
        return check_prompt(tokens, self.info, f"shorten the prompt; this TFLite model's KV cache holds "
                            f"{self.layout.kv_len} tokens (convert it again with a larger kv_cache_max_len for more)")

    def check_params(self, params: SamplingParams) -> Any:
        """The compiled grammar of ``params`` (None when unconstrained); a ``logit_bias`` token
        outside the vocabulary or a grammar llguidance refuses raises here, before any work."""
        check_logit_bias(params, self.info)
        return self.grammars.compile(params)

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens``, reusing whatever prefix the cache already holds.

        A prompt that is empty or does not fit the context, or parameters ``check_params``
        refuses, raise here, before any streaming.
        """
        tokens = self.check_prompt(tokens)
        self.check_params(params)
        return self.slots.generate(tokens, params, cancel)

    def acquire_slot(self, prompt: Sequence[int] | None = None,
                     timeout: float | None = None) -> AbstractContextManager[TfliteSlot]:
        """Wait up to ``timeout`` seconds (None: forever) for the model's one sequence."""
        return self.slots.acquire(prompt, timeout)

    def _stream(self, tokens: list[int], params: SamplingParams, template: Any,
                cancel: CancelToken) -> Iterator[TokenEvent]:
        started = time.perf_counter()
        # The last prompt token is always evaluated again: its logits pick the first new token.
        kept = min(self.prefix.common_length(tokens), len(tokens) - 1)
        del self.prefix.tokens[kept:]
        todo, pos, done = tokens[kept:], kept, 0
        text = StreamingText.for_params(params)
        pieces = self.tokenizer.streaming_decoder(tokens)
        sampler = Sampler(params, GrammarState(template, self.info.n_vocab) if template is not None else None)
        history = list(tokens)
        n_gen, first_token_at, prefill_end = 0, 0.0, 0.0

        def finish(reason: str) -> TokenEvent:
            end = time.perf_counter()
            stats = GenerationStats(
                prompt_tokens=len(tokens), cached_tokens=kept, evaluated_tokens=done, gen_tokens=n_gen,
                ttft_s=(first_token_at or end) - started, prefill_s=(prefill_end or end) - started,
                decode_s=end - first_token_at if n_gen else 0.0,
            )
            tail = "" if text.stopped else text.push(pieces.flush()) + text.flush()
            return TokenEvent(None, tail, reason, stats)

        logits = None
        for signature, n_real, width in plan_chunks(len(todo), pos, self.layout.prefill_lengths, self.layout.kv_len):
            if cancel.cancelled:
                yield finish("cancelled")
                return
            chunk = todo[done:done + n_real]
            logits = self._run(signature, chunk, pos, width, rows=int(done + n_real == len(todo)))
            pos, done = pos + n_real, done + n_real
        prefill_end = time.perf_counter()
        while True:
            if cancel.cancelled:
                yield finish("cancelled")
                return
            token = sampler.pick(logits, history)
            logprob, top = sampler.logprobs(logits, token)
            if self.tokenizer.is_end(token):
                yield finish("stop")
                return
            complete = sampler.advance(token)
            n_gen += 1
            if n_gen == 1:
                first_token_at = time.perf_counter()
            history.append(token)
            piece = text.push(pieces.push(token))
            if text.stopped:
                if piece:
                    yield TokenEvent(token, piece, logprob=logprob, top_logprobs=top)
                yield finish("stop")
                return
            yield TokenEvent(token, piece, logprob=logprob, top_logprobs=top)
            if complete:  # the grammar allows nothing but an end token now
                yield finish("stop")
                return
            if n_gen >= params.max_tokens or pos + 1 >= self.info.n_ctx:
                yield finish("length")
                return
            logits = self._run(DECODE, [token], pos, 1, rows=1)
            pos += 1

    def _run(self, signature: str, chunk: list[int], pos: int, width: int, rows: int) -> Any:
        """The last token's logits (one row) when ``rows`` is 1, all ``rows`` last rows when more."""
        try:
            logits = self.engine.run(signature, chunk, pos, width, rows)
        except BaseException:
            # The cache may hold part of a failed step: forget the prefix rather than trust it.
            self.prefix.tokens.clear()
            raise
        self.prefix.tokens.extend(chunk)
        self.evaluated_total += len(chunk)
        return logits[-1] if rows == 1 else logits

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate ``tokens`` from position 0 and yield (position, logit rows) from ``first`` on.

        For quality measurement: every position's logits, chunk by chunk as the prefill
        signatures evaluate them, on the model's one sequence (its cached prefix becomes ``tokens``).
        """
        tokens = self.check_prompt(tokens)
        if not self.slots.n_free:
            raise GenerationError("this model is already generating", "wait for the answer in progress")
        return self._logit_rows_in_slot(tokens, first)

    def _logit_rows_in_slot(self, tokens: list[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        with self.slots.acquire():
            self.prefix.tokens.clear()
            pos = 0
            for signature, n_real, width in plan_chunks(len(tokens), 0, self.layout.prefill_lengths,
                                                        self.layout.kv_len):
                chunk = tokens[pos:pos + n_real]
                rows = min(n_real, pos + n_real - first)
                logits = self._run(signature, chunk, pos, width, rows=max(0, rows))
                if rows > 0:
                    yield pos + n_real - rows, logits.reshape(rows, -1)
                pos += n_real

    def reset(self) -> None:
        """Forget the cached prefix (the next call evaluates the whole prompt)."""
        with self.slots.idle() as idle:
            for slot in idle:
                slot.prefix.tokens.clear()

    def close(self) -> None:
        """Free the interpreter and its buffers; safe to call twice."""
        if hasattr(self, "slots"):
            self.slots.close()
        if hasattr(self, "grammars"):
            self.grammars.close()
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def __enter__(self) -> TfliteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
