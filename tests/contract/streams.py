"""What the contract tests share: the context, the prompts, and a generation stream collected into one result."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from edge_runtime.backends.base import CancelToken, GenerationStats, SamplingParams, TokenEvent

# Every backend gets the context the TFLite export holds (test_tflite.KV_LEN; LiteRT cannot go
# past its exported cache), so the context-limit tests mean the same thing for all three.
N_CTX = 128
PROMPT = "The river ran past the mill and under the old stone bridge, and"
OTHER_PROMPT = "To be, or not to be, that is the question:"
GREEDY = SamplingParams(max_tokens=16, temperature=0.0)
SAMPLED = SamplingParams(max_tokens=16, temperature=0.9, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
                         seed=7)


@dataclass(frozen=True)
class Stream:
    """One generation: the tokens and text it streamed, and its last event."""

    tokens: list[int]
    text: str
    events: list[TokenEvent]

    @property
    def finish_reason(self) -> str | None:
        return self.events[-1].finish_reason

    @property
    def stats(self) -> GenerationStats:
        stats = self.events[-1].stats
        assert stats is not None, "the last event carries no stats"
        return stats


def collect(events: Iterable[TokenEvent]) -> Stream:
    """Drain a stream, checking its shape: only the last event finishes, and it carries the stats."""
    got = list(events)
    assert got, "the stream gave no event at all"
    assert all(e.finish_reason is None and e.stats is None for e in got[:-1]), got
    assert got[-1].finish_reason in ("stop", "length", "cancelled") and got[-1].stats is not None, got[-1]
    tokens = [e.token for e in got if e.token is not None]
    return Stream(tokens, "".join(e.text for e in got), got)


def run(model, tokens: Sequence[int], params: SamplingParams = GREEDY, cancel: CancelToken | None = None) -> Stream:
    """``model.generate`` (or a slot's), collected."""
    return collect(model.generate(tokens, params, cancel=cancel))
