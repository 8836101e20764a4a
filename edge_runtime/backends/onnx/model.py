"""A loaded ONNX model: tokenizer, slots (one genai generator each) and the generation loop.

Each slot owns a genai generator, whose KV cache holds ``max_length = n_ctx`` positions, and the
tokens evaluated into it. A call rewinds the cache to the prefix its prompt shares with those
tokens and evaluates only the rest, in chunks, then picks tokens from the logits one by one.
Generation runs on the consumer's thread; slots let a server run several conversations at once
(each on its own generator, sharing the model's weights).

Text goes through the folder's ``tokenizer.json`` (``HFTokenizer``), never genai's tokenizer: the
latter always parses control tokens written in user text and cannot say whether the model adds
BOS. Our converter always writes ``tokenizer.json``; a folder with only ``tokenizer.model`` gets a
one-line error saying to convert it again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
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
from edge_runtime.backends.onnx import native
from edge_runtime.backends.sampling import Sampler
from edge_runtime.backends.slots import SlotPool, StreamGuard
from edge_runtime.backends.text import StreamingText
from edge_runtime.backends.tokenizer import HFTokenizer
from edge_runtime.errors import GenerationError, ModelLoadError
from edge_runtime.formats.onnx import OnnxFolder, read_onnx_folder


class OnnxSlot:
    """One sequence (genai generator) of a model, used by one generation at a time."""

    def __init__(self, model: OnnxModel) -> None:
        self._model = model
        self.prefix = EvaluatedPrefix()
        self._seq: native.GenaiSequence | None = None
        self._guard = StreamGuard()

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Exactly ``Model.generate``, on this slot's cache."""
        tokens = self._model.check_prompt(tokens)
        template = self._model.check_params(params)
        cancel = cancel or CancelToken()
        return self._guard.start(self._stream(tokens, params, template, cancel), cancel)

    def wait_idle(self) -> None:
        """Stop what the slot still generates (nobody is reading it) and wait until it has."""
        self._guard.wait_idle()

    def clear(self) -> None:
        """Forget what the cache holds (the next call rewinds to zero and evaluates it all)."""
        self.prefix.tokens.clear()

    def forget(self) -> None:
        """Drop the generator itself (after a failure, or to free its memory)."""
        self._seq = None
        self.prefix.tokens.clear()

    def _reuse(self, tokens: list[int]) -> tuple[native.GenaiSequence, int]:
        # The last prompt token is always evaluated again: its logits pick the first new token.
        kept = min(self.prefix.common_length(tokens), len(tokens) - 1)
        if self._seq is None:
            # A generator allocates its whole KV cache up front: made once, then rewound.
            self._seq = self._model.new_sequence()
            kept = 0
        else:
            self._seq.rewind_to(kept)
        del self.prefix.tokens[kept:]
        return self._seq, kept

    def _stream(self, tokens: list[int], params: SamplingParams, template: Any,
                cancel: CancelToken) -> Iterator[TokenEvent]:
        started = time.perf_counter()
        model = self._model
        text = StreamingText.for_params(params)
        sampler = Sampler(params, GrammarState(template, model.info.n_vocab) if template is not None else None)
        pieces = model.tokenizer.streaming_decoder(tokens)
        history = list(tokens)
        n_gen, evaluated, prefill_end, first_at, reason = 0, 0, 0.0, 0.0, "length"
        try:
            seq, kept = self._reuse(tokens)
            todo = tokens[kept:]
            while todo and not cancel.cancelled:  # chunks bound the logits buffer, and Ctrl-C waits less
                chunk, todo = todo[:native.PREFILL_CHUNK], todo[native.PREFILL_CHUNK:]
                seq.append(chunk)
                self.prefix.tokens.extend(chunk)
                evaluated += len(chunk)
            while True:
                if cancel.cancelled:
                    reason = "cancelled"
                    break
                logits = seq.last_logits()
                if n_gen == 0:
                    prefill_end = time.perf_counter()
                token = sampler.pick(logits, history)
                logprob, top = sampler.logprobs(logits, token)
                if model.tokenizer.is_end(token):
                    reason = "stop"
                    break
                complete = sampler.advance(token)
                n_gen += 1
                if n_gen == 1:
                    first_at = time.perf_counter()
                piece = text.push(pieces.push(token))
                if text.stopped:
                    reason = "stop"
                    if piece:
                        yield TokenEvent(token, piece, logprob=logprob, top_logprobs=top)
                    break
                yield TokenEvent(token, piece, logprob=logprob, top_logprobs=top)
                if complete:  # the grammar allows nothing but an end token now
                    reason = "stop"
                    break
                if n_gen >= params.max_tokens or len(self.prefix.tokens) + 1 >= model.info.n_ctx:
                    break
                seq.append([token])
                self.prefix.tokens.append(token)
                history.append(token)
        except GeneratorExit:
            raise  # abandoned between tokens: the cache and the prefix still agree
        except BaseException:
            self.forget()  # a step that failed half-way: trust nothing in the cache
            raise
        end = time.perf_counter()
        stats = GenerationStats(
            prompt_tokens=len(tokens), cached_tokens=kept, evaluated_tokens=evaluated, gen_tokens=n_gen,
            ttft_s=(first_at or end) - started, prefill_s=(prefill_end or end) - started,
            decode_s=end - first_at if n_gen else 0.0,
        )
        tail = "" if text.stopped else text.push(pieces.flush()) + text.flush()
        yield TokenEvent(None, tail, reason, stats)


class OnnxModel:
    """An ONNX folder loaded in onnxruntime-genai, with ``Settings.n_parallel`` slots."""

    def __init__(self, path: str, settings: Settings) -> None:
        self.folder = read_onnx_folder(path)  # our checks first: bad folders never reach onnxruntime
        self.path = str(self.folder.path)
        # Before the model: a folder without tokenizer.json fails at once, with what to do.
        self.tokenizer = HFTokenizer(self.folder.path, bos_id=self.folder.bos_id, eos_ids=self.folder.eos_ids)
        n_ctx = min(settings.n_ctx, self.folder.max_length) if settings.n_ctx > 0 else self.folder.max_length
        self.settings = Settings.from_dict({**settings.to_dict(), "n_ctx": n_ctx})
        self.n_threads = settings.n_threads or default_threads()
        self.provider = choose_provider(self.folder)
        try:
            self.og_model = native.load_model(self.path, n_threads=self.n_threads, provider=self.provider)
        except ModelLoadError as exc:
            if self.folder.providers and self.provider is None:  # built for a GPU this machine lacks
                wanted = ", ".join(self.folder.providers)
                raise ModelLoadError(exc.message, f"it was built for the {wanted} execution provider, which "
                                     "onnxruntime does not offer here: convert it for cpu") from None
            raise
        self.info = self._model_info(n_ctx)
        self.slots = SlotPool([OnnxSlot(self) for _ in range(max(1, settings.n_parallel))])
        self.grammars = tokenizer_json_compiler(self.tokenizer.path, self.info.n_vocab, self.tokenizer.end_ids)

    def _model_info(self, n_ctx: int) -> ModelInfo:
        folder, tok = self.folder, self.tokenizer
        name = folder.path.name
        if folder.precision and name.endswith(f"-{folder.precision}-onnx"):
            name = name[: -len(f"-{folder.precision}-onnx")]
        return ModelInfo(
            name=name, arch=folder.arch, quant=folder.precision, n_ctx_train=folder.max_length, n_ctx=n_ctx,
            n_vocab=folder.n_vocab, n_params=folder.n_params or 0, size_bytes=folder.size_bytes,
            chat_template=tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token, add_bos=tok.add_bos,
        )

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a generation (the tokenizer's end ids)."""
        return self.tokenizer.end_ids

    def new_sequence(self) -> native.GenaiSequence:
        """A genai generator with a KV cache of ``n_ctx`` positions (a window's worth at least)."""
        if self.og_model is None:
            raise GenerationError("the model is closed")
        return native.GenaiSequence(self.og_model, self.folder.cache_positions(self.info.n_ctx))

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        return self.tokenizer.encode(text, special=special, add_bos=add_bos)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``, control tokens included, so it tokenizes back to the same ids."""
        return self.tokenizer.decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.tokenizer.n_vocab:  # a padded head's extra rows have no token
            return b""
        raw = self.grammars.token_bytes(token)
        return raw if raw is not None else self.tokenizer.decode([token]).encode("utf-8")

    # -- generation ------------------------------------------------------------------------

    def check_prompt(self, tokens: Sequence[int]) -> list[int]:
        """The prompt as a list; see ``base.check_prompt`` for what raises."""
        return check_prompt(tokens, self.info)

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
                     timeout: float | None = None) -> AbstractContextManager[OnnxSlot]:
        """A free slot, preferring the one whose cache shares most with ``prompt``."""
        return self.slots.acquire(prompt, timeout)

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Evaluate ``tokens`` from position 0 and yield (position, logit rows) from ``first`` on.

        For quality measurement: every position's logits, ``native.PREFILL_CHUNK`` tokens at a time, in a
        generator of its own (the slots' caches are left as they are).
        """
        tokens = self.check_prompt(tokens)
        seq = self.new_sequence()
        for pos in range(0, len(tokens), native.PREFILL_CHUNK):
            chunk = tokens[pos:pos + native.PREFILL_CHUNK]
            seq.append(chunk)
            if pos + len(chunk) > first:
                rows = seq.appended_logits()[max(0, first - pos):]
                yield max(first, pos), rows

    def reset(self) -> None:
        """Forget the cache of every idle slot (their next call evaluates the whole prompt)."""
        with self.slots.idle() as idle:
            for slot in idle:
                slot.clear()

    def close(self) -> None:
        """Free the generators and the model; safe to call twice."""
        self.slots.close()
        for slot in self.slots:
            slot.forget()
        self.grammars.close()
        self.og_model = None

    def __enter__(self) -> OnnxModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def choose_provider(folder: OnnxFolder) -> str | None:
    """The execution provider the model was built for, if onnxruntime offers it here; else CPU."""
    import onnxruntime

    available = {native.PROVIDER_NAMES.get(p) for p in onnxruntime.get_available_providers()}
    return next((p for p in folder.providers if p in available), None)
