"""The slot pool every backend hands its sequences out with: prefix preference, least recently used,
the wait and its timeout, and a release that stops the slot's generation first."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence

import pytest

from edge_runtime.backends.base import CancelToken, EvaluatedPrefix, SamplingParams, Settings, TokenEvent
from edge_runtime.backends.slots import SlotPool, StreamGuard
from edge_runtime.errors import GenerationError, SlotsBusyError

GREEDY = SamplingParams(temperature=0, max_tokens=8)


class CountingSlot:
    """A slot whose generation counts on its consumer's thread (as ONNX and TFLite slots do),
    taking ``step_s`` per token, until it is told to stop."""

    def __init__(self, cached: Sequence[int] = (), step_s: float = 0.0) -> None:
        self.prefix = EvaluatedPrefix(list(cached))
        self.stopped = threading.Event()
        self._guard = StreamGuard()
        self._step_s = step_s

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        cancel = cancel or CancelToken()
        return self._guard.start(self._count(params.max_tokens, cancel), cancel)

    def _count(self, n: int, cancel: CancelToken) -> Iterator[TokenEvent]:
        try:
            for i in range(n):
                time.sleep(self._step_s)
                if cancel.cancelled:
                    yield TokenEvent(None, "", "cancelled")
                    return
                yield TokenEvent(i, str(i))
            yield TokenEvent(None, "", "length")
        finally:
            self.stopped.set()

    def wait_idle(self) -> None:
        self._guard.wait_idle()


def test_the_slot_sharing_most_with_the_prompt_comes_first_then_the_least_recently_used():
    a, b, c = CountingSlot([1, 2, 3]), CountingSlot([1, 2, 9, 9]), CountingSlot()
    pool = SlotPool([a, b, c])
    with pool.acquire([1, 2, 3, 4]) as got:
        assert got is a
    with pool.acquire([1, 2, 9]) as got:
        assert got is b
    # No slot shares anything with [7]: the one used least recently (c, never) goes first, then
    # among a and b the one released longer ago (a).
    with pool.acquire([7]) as got:
        assert got is c
    with pool.acquire([7]) as got:
        assert got is a
    # A held slot is not offered even when it would fit best.
    with pool.acquire([1, 2, 3]) as first, pool.acquire([1, 2, 3]) as second:
        assert first is a and second is not a


def test_a_wait_that_runs_out_raises_slots_busy_and_a_release_wakes_a_waiter():
    slot = CountingSlot()
    pool = SlotPool([slot])
    got: list[object] = []
    with pool.acquire():
        assert pool.n_free == 0
        with pytest.raises(SlotsBusyError) as err, pool.acquire(timeout=0.05):
            pass
        assert err.value.http_status == 503
        waiter = threading.Thread(target=lambda: got.append(_hold(pool, timeout=10)), daemon=True)
        waiter.start()
        time.sleep(0.05)
        assert not got  # still waiting
    waiter.join(timeout=10)
    assert got == [slot] and pool.n_free == 1


def _hold(pool: SlotPool, timeout: float) -> object:
    with pool.acquire(timeout=timeout) as slot:
        return slot


def test_a_release_stops_a_stream_left_between_tokens():
    slot = CountingSlot()
    pool = SlotPool([slot])
    with pool.acquire() as held:
        stream = held.generate([1], SamplingParams(max_tokens=1000))
        assert next(stream).token == 0
        with pytest.raises(GenerationError, match="already generating"):
            held.generate([1], GREEDY)
    assert slot.stopped.is_set()  # closed by the release, not left for the garbage collector
    assert list(stream) == []
    with pool.acquire() as held:  # and the next holder can generate at once
        assert [e.finish_reason for e in held.generate([1], GREEDY)][-1] == "length"


def test_a_release_waits_for_a_stream_running_on_another_thread():
    slot = CountingSlot(step_s=0.01)
    pool = SlotPool([slot])
    seen: list[TokenEvent] = []
    with pool.acquire() as held:
        stream = held.generate([1], SamplingParams(max_tokens=2000))
        reader = threading.Thread(target=lambda: seen.extend(stream), daemon=True)
        reader.start()
        while not seen:
            time.sleep(0.005)
    assert slot.stopped.is_set()  # the release returned only once the stream had stopped
    reader.join(timeout=10)
    assert not reader.is_alive() and len(seen) < 2000


def test_a_stream_never_started_does_not_keep_its_slot_busy():
    slot = CountingSlot()
    pool = SlotPool([slot])
    with pool.acquire() as held:
        held.generate([1], GREEDY)  # created, never read
    with pool.acquire() as held:
        assert list(held.generate([1], GREEDY))[-1].finish_reason == "length"


def test_a_closed_pool_refuses_and_wakes_its_waiters():
    pool = SlotPool([CountingSlot()])
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            _hold(pool, timeout=10)
        except BaseException as exc:
            errors.append(exc)

    with pool.acquire():
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        time.sleep(0.05)
        pool.close()
        waiter.join(timeout=10)
    assert len(errors) == 1 and isinstance(errors[0], GenerationError) and "closed" in str(errors[0])
    with pytest.raises(GenerationError, match="closed"):
        pool.generate([1], GREEDY, None)


# -- the pool in the llama.cpp backend, on the real model -------------------------------------


def test_llama_cpp_slots_prefer_their_cached_prompt(smollm2_path):
    from edge_runtime.backends.llamacpp.model import LlamaCppModel

    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=512, n_parallel=2, n_threads=2)) as model:
        a = model.tokenize("The capital of France is", add_bos=True)
        b = model.tokenize("Once upon a time, a small fox", add_bos=True)
        with model.acquire_slot(a) as s1, model.acquire_slot(b) as s2:
            list(s1.generate(a, GREEDY))
            list(s2.generate(b, GREEDY))
        for prompt, holder in ((b, s2), (a, s1), (b, s2)):
            with model.acquire_slot(prompt) as slot:
                assert slot is holder
                last = list(slot.generate(prompt, GREEDY))[-1]
            assert last.stats.cached_tokens == len(prompt) - 1


def test_llama_cpp_release_waits_until_the_scheduler_has_stopped_the_slot(smollm2):
    prompt = smollm2.tokenize("1, 2, 3, 4, 5, 6,", add_bos=smollm2.info.add_bos)
    with smollm2.acquire_slot(prompt) as slot:
        stream = slot.generate(prompt, SamplingParams(temperature=0, max_tokens=1000))
        assert next(stream).token is not None
    # Had the release not waited, the slot would still be generating and refuse a new stream.
    with smollm2.acquire_slot(prompt, timeout=0) as again:
        assert again is slot
        assert list(again.generate(prompt, GREEDY))[-1].finish_reason == "length"
    rest = list(stream)
    assert rest[-1].finish_reason == "cancelled" and rest[-1].stats.gen_tokens < 1000
