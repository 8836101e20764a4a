"""The sequences (slots) a model holds, handed out one caller at a time; shared by every backend.

``SlotPool`` keeps the free list: ``acquire`` takes the free slot whose cache shares the most
with the prompt (then the one used least recently), waits up to a timeout for one, and on release
stops whatever the slot still generates before anyone else gets it. A model with one sequence
(TFLite) is a pool of one.

``StreamGuard`` is the part of a slot whose generation runs on the consumer's own thread (ONNX,
TFLite): one stream at a time, and a way to stop it from outside.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Generic, Protocol, TypeVar

from edge_runtime.backends.base import CancelToken, EvaluatedPrefix, SamplingParams, TokenEvent
from edge_runtime.errors import GenerationError, SlotsBusyError


class PooledSlot(Protocol):
    """What the pool needs of a slot: the tokens its cache holds, a stream, a way to stop it."""

    @property
    def prefix(self) -> EvaluatedPrefix: ...

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]: ...

    def wait_idle(self) -> None: ...


S = TypeVar("S", bound=PooledSlot)


class SlotPool(Generic[S]):
    """Hands out free slots, preferring the one whose cache shares the most with the prompt."""

    def __init__(self, slots: Sequence[S]) -> None:
        self._slots = list(slots)
        self._free = list(self._slots)
        self._last_used = {id(s): 0.0 for s in self._slots}
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[S]:
        return iter(self._slots)

    @property
    def n_free(self) -> int:
        return len(self._free)

    @contextmanager
    def acquire(self, prompt: Sequence[int] | None = None, timeout: float | None = None) -> Iterator[S]:
        """Wait up to ``timeout`` seconds (None: forever) for a free slot; release stops its stream."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free or self._closed, timeout=timeout):
                raise SlotsBusyError(f"all {len(self._slots)} slots are busy",
                                     "try again when an answer in progress has finished")
            if self._closed:
                raise GenerationError("the model is closed")
            slot = max(self._free, key=lambda s: (s.prefix.common_length(prompt or ()), -self._last_used[id(s)]))
            self._free.remove(slot)
        try:
            yield slot
        finally:
            # Nobody reads what the slot may still generate: stop it before the next holder.
            slot.wait_idle()
            with self._cond:
                self._last_used[id(slot)] = time.monotonic()
                self._free.append(slot)
                self._cond.notify()

    def generate(self, tokens: list[int], params: SamplingParams, cancel: CancelToken | None) -> Iterator[TokenEvent]:
        """``Model.generate`` on a free slot. With one slot, a second stream is refused rather
        than left waiting for the first (one caller reading both would wait forever)."""
        if self._closed:
            raise GenerationError("the model is closed")
        if len(self._slots) == 1 and not self._free:
            raise GenerationError("this model is already generating", "wait for the answer in progress")
        return self._generate_in_slot(tokens, params, cancel)

    def _generate_in_slot(self, tokens: list[int], params: SamplingParams,
                          cancel: CancelToken | None) -> Iterator[TokenEvent]:
        with self.acquire(tokens) as slot:
            yield from slot.generate(tokens, params, cancel=cancel)

    @contextmanager
    def idle(self) -> Iterator[list[S]]:
        """The free slots, kept from being acquired while the block runs (to change their caches)."""
        with self._cond:
            yield list(self._free)

    def close(self) -> None:
        """Refuse every later acquire (waiters get an error); slots in use finish as they are."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class StreamGuard:
    """The one stream of a slot that generates on its consumer's thread.

    ``start`` refuses a second stream while one is open; ``wait_idle`` stops the open one: it
    closes a stream suspended between tokens at once, and cancels one running on another thread
    and waits for it to stop at its next token.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._done.set()
        self._stream: Generator[TokenEvent, None, None] | None = None
        self._cancel: CancelToken | None = None

    def start(self, body: Iterator[TokenEvent], cancel: CancelToken) -> Iterator[TokenEvent]:
        """``body`` as the slot's stream; raises while another stream of the slot is open."""
        with self._lock:
            if not self._done.is_set():
                raise GenerationError("this slot is already generating", "wait for the answer in progress")
            self._done.clear()
            self._stream, self._cancel = self._run(body), cancel
        return self._stream

    def _run(self, body: Iterator[TokenEvent]) -> Generator[TokenEvent, None, None]:
        try:
            yield from body
        finally:
            self._done.set()

    def wait_idle(self) -> None:
        """Stop the open stream, if any, and return once it has stopped."""
        with self._lock:
            stream, cancel = self._stream, self._cancel
            self._stream = self._cancel = None
        if stream is None or self._done.is_set():
            return
        assert cancel is not None
        cancel.cancel()
        try:
            stream.close()
        except ValueError:  # running on another thread: it sees the cancel before its next token
            self._done.wait()
            return
        self._done.set()  # closed (a stream never started has no finally to run)
