"""Logprobs from llama.cpp on SmolLM2, checked against the model's own logits computed independently.

A token's logprob is the log-softmax of the model's raw logits, before the temperature, the
penalties and a grammar's mask (OpenAI's definition), so it is the same whatever the sampling.
The contract suite checks the same on ONNX and TFLite.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge_runtime.backends.base import Grammar, SamplingParams
from edge_runtime.backends.sampling import token_logprobs


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - (row.max() + np.log(np.exp(row - row.max()).sum()))


@pytest.fixture(scope="module")
def prompt(smollm2) -> list[int]:
    return smollm2.tokenize("<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n", special=True)


def generated(model, prompt: list[int], params: SamplingParams):
    events = list(model.generate(prompt, params))
    return [e for e in events if e.token is not None]


def expected_rows(model, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """The log-softmax of the raw logits that chose each of ``tokens``, from a scoring pass."""
    rows = np.concatenate([r for _, r in model.logit_rows(prompt + tokens, len(prompt) - 1)])
    return np.stack([log_softmax(r) for r in rows[:len(tokens)]])


def test_greedy_logprobs_match_the_raw_logits(smollm2, prompt):
    events = generated(smollm2, prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))
    expected = expected_rows(smollm2, prompt, [e.token for e in events])
    for event, row in zip(events, expected, strict=True):
        assert event.logprob == pytest.approx(row[event.token], abs=2e-3)
        ids = [t for t, _ in event.top_logprobs]
        assert ids[0] == event.token  # greedy took the most likely token
        assert ids == [int(t) for t in np.argsort(-row, kind="stable")[:3]]
        assert [v for _, v in event.top_logprobs] == pytest.approx([row[t] for t in ids], abs=2e-3)


def test_under_a_grammar_and_a_temperature_the_logprob_is_still_the_models(smollm2, prompt):
    # The grammar forbids the model's favourite answers; the logprob still reports how likely the
    # model found the token it was made to take, not 0 as the masked distribution would say.
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=11, logprobs=0,
                            grammar=Grammar("regex", "(kiwi|plum)"))
    events = generated(smollm2, prompt, params)
    assert smollm2.detokenize([e.token for e in events]) in ("kiwi", "plum")
    expected = expected_rows(smollm2, prompt, [e.token for e in events])
    for event, row in zip(events, expected, strict=True):
        assert event.top_logprobs == ()
        assert event.logprob == pytest.approx(row[event.token], abs=2e-3)
    assert events[0].logprob < -0.01  # a token the model alone would not have been sure of


def test_token_logprobs_sorts_ties_by_id_and_sums_to_one():
    row = np.array([1.0, 3.0, 3.0, -2.0], dtype=np.float32)
    chosen, top = token_logprobs(row, 3, 4)
    assert [t for t, _ in top] == [1, 2, 0, 3]
    assert chosen == pytest.approx(top[-1][1])
    assert sum(np.exp(v) for _, v in top) == pytest.approx(1.0)
    assert token_logprobs(row, 0, 0)[1] == ()
