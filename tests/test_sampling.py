"""The numpy sampler ONNX and TFLite share: llama.cpp's chain, checked against hand computations,
and seeded draws that repeat."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.backends.base import SamplingParams
from edge_runtime.backends.sampling import Sampler

LOGITS = np.array([0.0, 3.0, 2.9, -1.0, 1.0, 2.0], dtype=np.float32)


def _softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    return [e / sum(exps) for e in exps]


def test_greedy_takes_the_best_token_after_the_repeat_penalty():
    greedy = SamplingParams(temperature=0)
    assert Sampler(greedy).pick(LOGITS) == 1
    # 3.0 / 1.5 = 2.0 falls below 2.9: the recent token 1 loses its place.
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5)).pick(LOGITS, [1]) == 2
    # Only the last repeat_last_n tokens count: token 1 is outside a window of 2.
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=2)).pick(LOGITS, [1, 4, 4]) == 1
    # -1: the whole history counts.
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=-1)).pick(LOGITS, [1, 4, 4]) == 2
    # A negative logit is multiplied, pushing it further down: -1.0 * 1.5 = -1.5 < -1.2.
    negative = np.array([-1.0, -1.2], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=1.5)).pick(negative, [0]) == 1


def test_the_chain_matches_a_hand_computation():
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.0)
    # top-k 4: ids 1, 2, 5, 4 (logits 3.0, 2.9, 2.0, 1.0); their probabilities at temperature 1
    # add up to 0.415, 0.791, 0.944: top-p 0.9 keeps the first three (the one crossing 0.9 included).
    probs = _softmax([3.0, 2.9, 2.0, 1.0])
    assert probs[0] + probs[1] < 0.9 <= probs[0] + probs[1] + probs[2]
    expected = _softmax([3.0 / 0.7, 2.9 / 0.7, 2.0 / 0.7])
    ids, got = Sampler(params).distribution(LOGITS)
    assert ids.tolist() == [1, 2, 5]
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    # min-p 0.4 keeps p >= 0.4 * p_max: logit >= 3.0 + ln 0.4 = 2.08, so token 5 (2.0) goes too.
    ids, got = Sampler(SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.4)).distribution(LOGITS)
    assert ids.tolist() == [1, 2]
    assert got.tolist() == pytest.approx(_softmax([3.0 / 0.7, 2.9 / 0.7]), rel=1e-6)
    # Every filter keeps at least one token.
    ids, got = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.01, min_p=0.99)).distribution(LOGITS)
    assert ids.tolist() == [1] and got.tolist() == [1.0]


def test_top_k_zero_and_top_p_one_leave_every_token():
    ids, got = Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0)).distribution(LOGITS)
    assert sorted(ids.tolist()) == list(range(len(LOGITS)))
    expected = dict(zip(range(len(LOGITS)), _softmax([v / 2.0 for v in LOGITS.tolist()]), strict=True))
    assert got.tolist() == pytest.approx([expected[i] for i in ids.tolist()], rel=1e-6)


def test_the_draw_inverts_one_uniform_number_per_token():
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, min_p=0.4, seed=11)
    p1 = _softmax([3.0 / 0.7, 2.9 / 0.7])[0]
    uniforms = np.random.default_rng(11).random(64)
    expected = [1 if u < p1 else 2 for u in uniforms]
    sampler = Sampler(params)
    assert [sampler.pick(LOGITS) for _ in range(64)] == expected
    assert set(expected) == {1, 2}


def test_one_seed_gives_one_sequence_and_another_seed_another():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(40, 500)).astype(np.float32)  # a flat distribution: many candidates
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.1, seed=7)

    def run(p: SamplingParams) -> list[int]:
        sampler, history = Sampler(p), [3, 4]
        for row in rows:
            history.append(sampler.pick(row, history))
        return history[2:]

    first = run(params)
    assert run(params) == first
    assert run(SamplingParams(**{**params.__dict__, "seed": 8})) != first

