"""Shared prefixes across slots: a prompt part another slot already holds is copied
(``llama_memory_seq_cp``), not evaluated again, on real llama.cpp."""

from __future__ import annotations

from collections import Counter

from edge_runtime.backends.base import SamplingParams, Settings
from edge_runtime.backends.llamacpp.model import LlamaCppModel

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


def common_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokens_of(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


def concurrently(model: LlamaCppModel, a: list[int], b: list[int]) -> tuple[list, list, Counter[str]]:
    """Both prompts submitted together on two slots: their events and, per prompt ("a", "b"), the
    prompt positions ``llama_decode`` evaluated."""
    prompts: dict[int, tuple[str, int]] = {}
    prompt_rows: Counter[str] = Counter()
    decode = model.context.decode

    def observed(entries):
        for _, pos, seq, _ in entries:
            name, length = prompts[seq]
            if pos < length:
                prompt_rows[name] += 1
        decode(entries)

    model.reset()
    model.context.decode = observed
    try:
        with model.acquire_slot(a) as first, model.acquire_slot(b) as second:
            prompts.update({first.seq.seq_id: ("a", len(a)), second.seq.seq_id: ("b", len(b))})
            events_a, events_b = first.generate(a, GREEDY), second.generate(b, GREEDY)
            return list(events_a), list(events_b), prompt_rows
    finally:
        model.context.decode = decode


def test_two_slots_with_one_system_prompt_evaluate_it_once(smollm2_path, prose):
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=1024, n_parallel=2, n_threads=2)) as model:
        system = model.tokenize(prose[:1600], add_bos=True)[:150]
        other_system = model.tokenize(prose[3000:4600], add_bos=True)[:150]
        a_tail = model.tokenize(" Question: what is an assert statement for?")
        b = system + model.tokenize(" Now tell me, in a few words, what yield does.")
        a = system + a_tail
        shared = common_length(a, b)
        _, answer_b, prompt_rows = concurrently(model, a, b)
        # The system prompt was evaluated once, by the first slot; the second evaluated its own part.
        assert prompt_rows["a"] == len(a) and prompt_rows["b"] == len(b) - shared
        stats_b = answer_b[-1].stats
        assert stats_b.cached_tokens == shared and stats_b.evaluated_tokens == len(b) - shared

        # The same two requests in the same batches, but the first with another system prompt:
        # nothing to share (the BOS token aside), and the second answers exactly as before.
        _, unshared_b, prompt_rows = concurrently(model, other_system + a_tail, b)
        assert prompt_rows["b"] == len(b) - common_length(other_system, b)
        assert tokens_of(answer_b) == tokens_of(unshared_b)


def test_a_later_request_copies_the_prefix_an_idle_slot_holds(smollm2_path, prose):
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=1024, n_parallel=2, n_threads=2)) as model:
        system = model.tokenize(prose[:1600], add_bos=True)[:120]
        a, b = system + model.tokenize(" First?"), system + model.tokenize(" Second, longer one?")
        with model.acquire_slot(a) as first:
            list(first.generate(a, GREEDY))
        with model.acquire_slot(b) as first_again, model.acquire_slot(b) as other:
            assert first_again.prefix.common_length(b) > other.prefix.common_length(b)
            copied = list(other.generate(b, GREEDY))
        assert copied[-1].stats.cached_tokens == common_length(a, b)
        model.reset()
        assert tokens_of(copied) == tokens_of(model.generate(b, GREEDY))
