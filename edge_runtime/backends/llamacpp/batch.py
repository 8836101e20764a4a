"""Continuous batching for the llama.cpp backend: slots, and the scheduler that advances them.

A model holds N sequences (slots) in one llama.cpp context. One scheduler thread owns the context:
each step it puts every decoding slot's next token and the next chunk of the oldest prompt still
being prefilled into a single ``llama_decode`` batch, then samples each slot's token with
llama.cpp's sampler chain (plain greedy: the argmax of the logits row, in place). New requests
join between steps. Consumers read their slot's events from a queue, so the chat loop, the server
and the bench all see the same ``Iterator[TokenEvent]``.

Under a grammar, the masks of every constrained slot are computed on this thread right after the
decode, in one llguidance call, and the chain's first link applies them; the answer ends with
``stop`` on an end-of-generation token or as soon as the grammar is complete, and with
``length`` (the text so far) at ``max_tokens`` or the context's end. Unconstrained requests get
no mask, no matcher and no logits copied (unless they ask for logprobs).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime.backends.base import CancelToken, EvaluatedPrefix, GenerationStats, SamplingParams, TokenEvent
from edge_runtime.backends.constraints import GrammarState, MaskRows
from edge_runtime.backends.llamacpp import native
from edge_runtime.backends.llamacpp.sampler import Sampler
from edge_runtime.backends.sampling import token_logprobs
from edge_runtime.backends.text import StreamingText
from edge_runtime.errors import GenerationError
from edge_runtime.models.prompt_cache import common_length

if TYPE_CHECKING:
    from edge_runtime.backends.llamacpp.model import LlamaCppModel
    from edge_runtime.models.prompt_cache import CachedPrefix


class _Sequence:
    """One sequence id in the shared context and the tokens its KV cache holds."""

    def __init__(self, seq_id: int) -> None:
        self.seq_id = seq_id
        self.prefix = EvaluatedPrefix()


@dataclass
class _Request:
    """One generation in flight; only the scheduler thread touches its mutable state."""

    seq: _Sequence
    tokens: list[int]
    params: SamplingParams
    cancel: CancelToken
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    finished: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.perf_counter)
    todo: list[int] = field(default_factory=list)  # prompt tokens still to prefill
    pos: int = 0  # position of the next token to evaluate
    kept: int = 0
    next_token: int | None = None  # sampled, not yet evaluated
    out_index: int = -1  # batch row whose logits this request samples this step
    n_gen: int = 0
    prefill_end: float = 0.0
    first_token_at: float = 0.0
    template: Any = None  # the compiled grammar (llguidance matcher), None when unconstrained
    grammar: GrammarState | None = None
    sampler: Sampler | None = None
    text: StreamingText | None = None
    restore: CachedPrefix | None = None  # a saved state of a longer prefix, read from disk


class LlamaCppSlot:
    """One sequence of a model, acquired for one conversation turn at a time."""

    def __init__(self, model: LlamaCppModel, seq_id: int) -> None:
        self._model = model
        self.seq = _Sequence(seq_id)
        self._current: _Request | None = None

    @property
    def prefix(self) -> EvaluatedPrefix:
        """The tokens this slot's KV cache holds."""
        return self.seq.prefix

    def generate(
        self, tokens: Sequence[int], params: SamplingParams, *, cancel: CancelToken | None = None
    ) -> Iterator[TokenEvent]:
        """Exactly ``Model.generate``, on this slot's sequence."""
        tokens = self._model.check_prompt(tokens)
        template = self._model.check_params(params)
        if self._current is not None and not self._current.finished.is_set():
            raise GenerationError("this slot is already generating", "wait for the answer in progress")
        scheduler = self._model.scheduler
        if scheduler is None:
            raise GenerationError("the model is closed")
        request = _Request(self.seq, tokens, params, cancel or CancelToken(), template=template)
        disk = self._model.disk
        if disk is not None:  # read and checked here, on the caller's thread, not the scheduler's
            # Only a state longer than any slot holds: a prefix in memory is copied for free.
            held = max(common_length(list(slot.seq.prefix.tokens), tokens) for slot in self._model.slots)
            request.restore = disk.lookup(tokens, held)
        self._current = request
        scheduler.submit(request)
        return _stream(request)

    def wait_idle(self) -> None:
        """Stop what the slot still generates (nobody is reading it) and wait until it has."""
        request = self._current
        if request is not None:
            if not request.finished.is_set():
                request.cancel.cancel()
            request.finished.wait()


def _stream(request: _Request) -> Iterator[TokenEvent]:
    try:
        while True:
            item = request.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        # An abandoned stream (client gone, consumer broke out) stops within one token.
        if not request.finished.is_set():
            request.cancel.cancel()


class BatchScheduler:
    """The one thread that calls ``llama_decode`` for a model."""

    def __init__(self, model: LlamaCppModel) -> None:
        self._model = model
        self._ctx = model.context
        self._vocab = model.native_model.vocab
        self._masks: MaskRows | None = None  # made for the first constrained request
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._cond = threading.Condition()
        self._stopped = False
        # Held while a step touches the context; others (reset) take it to change the cache.
        self.context_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="edgert-llama-scheduler", daemon=True)
        self._thread.start()

    def submit(self, request: _Request) -> None:
        with self._cond:
            if self._stopped:
                raise GenerationError("the model is closed")
            self._pending.append(request)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    # -- the loop (scheduler thread only) --------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._active or self._stopped)
                if self._stopped:
                    for request in self._pending + self._active:
                        self._fail(request, GenerationError("the model was closed"))
                    return
                joining, self._pending = self._pending, []
            try:
                with self.context_lock:
                    for request in joining:
                        self._start(request)
                    self._step()
            except Exception as exc:  # never let the thread die with requests waiting
                for request in list(self._active):
                    self._fail(request, exc if isinstance(exc, GenerationError) else GenerationError(str(exc)))

    def _start(self, request: _Request) -> None:
        request.kept = reuse_prefix(self._ctx, request.seq, request.tokens, self._model.n_swa)
        entry, request.restore = request.restore, None
        disk = self._model.disk
        if entry is not None and disk is not None and min(entry.shared, len(request.tokens) - 1) > request.kept:
            seq = request.seq
            self._ctx.seq_clear(seq.seq_id)
            restored = disk.restore(self._ctx, seq.seq_id, entry)
            seq.prefix.tokens[:] = entry.tokens if restored else []
            # Cut the restored cache back to the part the prompt shares, as for a prefix in memory.
            request.kept = reuse_prefix(self._ctx, seq, request.tokens, self._model.n_swa)
        request.todo = request.tokens[request.kept :]
        request.pos = request.kept
        info = self._model.info
        if request.template is not None:
            if self._masks is None:
                self._masks = MaskRows(self._model.settings.n_parallel, info.n_vocab)
            request.grammar = self._masks.start(request.template, request.seq.seq_id)
        request.sampler = Sampler(request.params, info.n_vocab, info.n_ctx, request.grammar)
        request.text = StreamingText.for_params(request.params)
        if request.sampler.uses_history:
            request.sampler.accept_prompt(request.tokens)
        self._active.append(request)

    def _step(self) -> None:
        for request in [r for r in self._active if r.cancel.cancelled]:
            self._finish(request, "cancelled")
        if not self._active:
            return
        entries: list[tuple[int, int, int, bool]] = []
        fed: list[tuple[_Request, list[int]]] = []
        n_batch = self._ctx.n_batch
        # Decoding slots first: one token each keeps every stream moving during a long prefill.
        for request in self._active:
            if request.next_token is not None:
                request.out_index = len(entries)
                entries.append((request.next_token, request.pos, request.seq.seq_id, True))
                fed.append((request, [request.next_token]))
        # Then one prompt, the oldest waiting: prompts that arrive together are prefilled one after
        # another, so the first answers while the next is evaluated (on a CPU, evaluating them in
        # one batch saves little and makes every one of them wait for all).
        request = next((r for r in self._active if r.next_token is None and r.todo), None)
        if request is not None:
            self._share_prefix(request)
        if request is not None and len(entries) < n_batch:
            chunk = request.todo[: n_batch - len(entries)]
            done = len(chunk) == len(request.todo)
            for i, token in enumerate(chunk):
                entries.append((token, request.pos + i, request.seq.seq_id, done and i == len(chunk) - 1))
            request.out_index = len(entries) - 1 if done else -1
            fed.append((request, chunk))
        try:
            self._ctx.decode(entries)
        except GenerationError as exc:
            for request, _ in fed:
                self._fail(request, exc)
            return
        for request, tokens in fed:
            request.seq.prefix.tokens.extend(tokens)
            request.pos += len(tokens)
            if request.next_token is None:
                del request.todo[: len(tokens)]
            self._model.evaluated_total += len(tokens)
        sampling = [r for r, _ in fed if r.out_index >= 0 and not r.finished.is_set()]
        grammars = [r.grammar for r in sampling if r.grammar is not None]
        if grammars:
            assert self._masks is not None
            self._masks.fill(grammars)
        for request in sampling:
            self._sample(request)

    def _sample(self, request: _Request) -> None:
        assert request.sampler is not None and request.text is not None
        if request.n_gen == 0:
            request.prefill_end = time.perf_counter()
        token = request.sampler.sample(self._ctx, request.out_index)
        logprob, top = None, ()
        if request.params.logprobs is not None:  # the only case that copies logits into Python
            row = self._ctx.logits_row(request.out_index, self._model.info.n_vocab)
            logprob, top = token_logprobs(row, token, request.params.logprobs)
        request.out_index = -1
        if native.is_end_of_generation(self._vocab, token):
            self._finish(request, "stop")
            return
        if request.grammar is not None:
            try:
                request.grammar.consume(token)
            except GenerationError as exc:
                self._fail(request, exc)
                return
        request.n_gen += 1
        if request.n_gen == 1:
            request.first_token_at = time.perf_counter()
        piece = request.text.push(self._model.native_model.token_to_piece(token, self._model.piece_buffer))
        if request.text.stopped:
            if piece:
                request.events.put(TokenEvent(token, piece, logprob=logprob, top_logprobs=top))
            self._finish(request, "stop")
            return
        request.events.put(TokenEvent(token, piece, logprob=logprob, top_logprobs=top))
        if request.grammar is not None and request.grammar.stopped:
            self._finish(request, "stop")  # complete: only an end token could follow
            return
        if request.n_gen >= request.params.max_tokens or request.pos + 1 >= self._model.info.n_ctx:
            self._finish(request, "length")
            return
        request.next_token = token

    def _finish(self, request: _Request, reason: str) -> None:
        end = time.perf_counter()
        prefill_end = request.prefill_end or end
        stats = GenerationStats(
            prompt_tokens=len(request.tokens),
            cached_tokens=request.kept,
            evaluated_tokens=len(request.tokens) - request.kept - len(request.todo),
            gen_tokens=request.n_gen,
            ttft_s=(request.first_token_at or end) - request.started,
            prefill_s=prefill_end - request.started,
            decode_s=end - request.first_token_at if request.n_gen else 0.0,
        )
        text = request.text.flush() if request.text is not None else ""
        self._release(request)
        request.events.put(TokenEvent(None, text, reason, stats))
        try:
            disk = self._model.disk  # read once: ``use_prompt_cache`` may swap it between steps
            if disk is not None:  # after the answer is out: the copy delays only the next step
                disk.save_later(self._ctx, request.seq.seq_id, request.seq.prefix.tokens)
        finally:
            request.finished.set()  # after the copy is queued: ``disk.flush`` after a stream ends sees it

    def _share_prefix(self, request: _Request) -> None:
        """Copy from another slot the part of the prompt it holds beyond what this one has.

        N clients with the same system prompt pay for it once: prompts are prefilled one after
        another, so when the second comes up the first already holds the shared part.
        """
        best, best_len = None, request.pos
        last = len(request.tokens) - 1  # the last prompt token is evaluated: its logits pick the first token
        for slot in self._model.slots:
            other = slot.seq
            if other is request.seq:
                continue
            n = min(other.prefix.common_length(request.tokens), last)
            if n > best_len:
                best, best_len = other, n
        if best is None or self._model.recurrent:
            return  # a recurrent state is one per sequence: ``seq_cp`` cannot share a part of it
        n_swa = self._model.n_swa
        if n_swa > 0 and self._ctx.seq_pos_min(best.seq_id) > max(0, best_len - n_swa):
            return  # the window the next token attends to has left the other slot's cache
        seq = request.seq
        self._ctx.seq_clear(seq.seq_id)
        self._ctx.seq_copy(best.seq_id, seq.seq_id, best_len)
        request.kept += best_len - request.pos
        seq.prefix.tokens[:] = request.tokens[:best_len]
        request.pos = best_len
        request.todo = request.tokens[best_len:]

    def _fail(self, request: _Request, exc: BaseException) -> None:
        # The cache may hold part of a failed batch: forget the sequence rather than trust it.
        self._ctx.seq_clear(request.seq.seq_id)
        request.seq.prefix.tokens.clear()
        self._release(request)
        request.events.put(exc)
        request.finished.set()

    def _release(self, request: _Request) -> None:
        if request.sampler is not None:
            request.sampler.close()
            request.sampler = None
        # The matcher may point into the model's vocabulary: nothing keeps it past its request.
        request.grammar = request.template = None
        if request in self._active:
            self._active.remove(request)


def reuse_prefix(ctx: native.NativeContext, seq: _Sequence, tokens: list[int], n_swa: int) -> int:
    """Trim a sequence's cache to the prefix it shares with ``tokens``; return its length."""
    kept = seq.prefix.common_length(tokens)
    # The last prompt token is always evaluated again: its logits pick the first new token.
    kept = min(kept, len(tokens) - 1)
    if kept > 0:
        # A sliding-window cache forgets old positions as it goes. If the window the next
        # token must attend to is already gone, this prefix cannot be served from the cache.
        pos_min = ctx.seq_pos_min(seq.seq_id)
        if pos_min < 0 or pos_min > max(0, kept - max(1, n_swa)):
            kept = 0
    if 0 < kept < len(seq.prefix.tokens) and not ctx.seq_remove(seq.seq_id, kept):
        kept = 0  # a cache that cannot be cut mid-way (recurrent state): start over
    if kept == 0:
        ctx.seq_clear(seq.seq_id)
    del seq.prefix.tokens[kept:]
    return kept
