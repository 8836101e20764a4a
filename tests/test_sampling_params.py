"""``SamplingParams`` refuses bad values itself, and the numpy chain applies the knobs and the mask."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_runtime.backends.base import Grammar, SamplingParams
from edge_runtime.backends.constraints import grammar_definition
from edge_runtime.backends.sampling import Sampler
from edge_runtime.errors import InvalidRequestError


@pytest.mark.parametrize(("field", "value", "words"), [
    ("temperature", math.nan, "temperature must be a number"),
    ("top_p", 1.5, "top_p must be a number from 0 to 1"),
    ("min_p", -0.1, "min_p"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("presence_penalty", 2.5, "presence_penalty must be a number from -2 to 2"),
    ("frequency_penalty", math.inf, "frequency_penalty"),
    ("repeat_penalty", 0.0, "repeat_penalty"),
    ("seed", 2**32 - 1, "seed must be an integer from 0 to 4294967294"),
    ("seed", -1, "seed"),
    ("logprobs", 21, "logprobs must be an integer from 0 to 20"),
    ("logprobs", True, "logprobs"),
    ("max_tokens", 0, "max_tokens"),
    ("logit_bias", {5: 101.0}, r"logit_bias\[5\]"),
    ("logit_bias", {-1: 1.0}, "logit_bias token id"),
    ("logit_bias", {1: math.nan}, r"logit_bias\[1\]"),
    ("stop", "end", "stop must be a sequence"),
    ("json_schema", "{}", "json_schema must be a JSON Schema object"),
    ("grammar", "  ", "grammar must not be empty"),
])
def test_a_bad_value_is_refused_naming_the_field(field, value, words):
    with pytest.raises(InvalidRequestError, match=words):
        SamplingParams(**{field: value})


def test_one_constraint_at_a_time_and_known_syntaxes():
    with pytest.raises(InvalidRequestError, match="not both"):
        SamplingParams(json_schema={"type": "object"}, grammar="start: /a/")
    with pytest.raises(InvalidRequestError, match="regex, lark, gbnf"):
        Grammar("ebnf", "x")
    assert SamplingParams(seed=2**32 - 2, logprobs=20, logit_bias={3: -100}).logit_bias == {3: -100.0}
    assert not SamplingParams().constrained and SamplingParams(grammar=Grammar("regex", "a")).constrained


def test_json_whitespace_is_bounded_by_default_and_a_schema_may_choose_compact():
    default = grammar_definition(SamplingParams(json_schema={"type": "object"}))
    assert r"[\\x20\\x0A]{0,16}" in default or "[\\x20\\x0A]{0,16}" in default
    compact = grammar_definition(SamplingParams(json_schema={"type": "object",
                                                             "x-guidance": {"whitespace_flexible": False}}))
    assert "{0,16}" not in compact
    assert grammar_definition(SamplingParams()) is None


LOGITS = np.array([0.0, 3.0, 2.9, -1.0, 1.0, 2.0], dtype=np.float32)


def test_logit_bias_and_penalties_move_the_greedy_choice():
    assert Sampler(SamplingParams(temperature=0)).pick(LOGITS) == 1
    assert Sampler(SamplingParams(temperature=0, logit_bias={1: -100})).pick(LOGITS) == 2
    assert Sampler(SamplingParams(temperature=0, logit_bias={3: 5})).pick(LOGITS) == 3
    # Frequency: 3.0 - 2 * 0.06 = 2.88 < 2.9 after two occurrences of token 1; once (2.94) is not enough.
    frequency = SamplingParams(temperature=0, frequency_penalty=0.06)
    assert Sampler(frequency).pick(LOGITS, [1, 1]) == 2 and Sampler(frequency).pick(LOGITS, [1]) == 1
    # Presence: once is enough, however often.
    assert Sampler(SamplingParams(temperature=0, presence_penalty=0.2)).pick(LOGITS, [1]) == 2
    # A negative penalty rewards the tokens seen.
    assert Sampler(SamplingParams(temperature=0, presence_penalty=-2.0)).pick(LOGITS, [5]) == 5


class FixedMask:
    """A grammar state whose mask is always the same ids (the sampler's side of ``GrammarState``)."""

    def __init__(self, n_vocab: int, ids: list[int]) -> None:
        self.mask = np.zeros(n_vocab, dtype=bool)
        self.mask[ids] = True

    def fill(self) -> None:
        pass

    def allowed(self) -> np.ndarray:
        return self.mask


def test_under_a_mask_only_allowed_ids_are_drawn():
    mask = FixedMask(len(LOGITS), [0, 3])
    assert Sampler(SamplingParams(temperature=0), mask).pick(LOGITS) == 0  # type: ignore[arg-type]
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0, seed=1), mask)  # type: ignore[arg-type]
    ids, probs = sampler.distribution(LOGITS)
    assert list(ids) == [0] and probs.tolist() == [1.0]
    wide = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), mask)  # type: ignore[arg-type]
    ids, probs = wide.distribution(LOGITS)
    assert list(ids) == [0, 3] and probs.sum() == pytest.approx(1.0)
    assert {wide.pick(LOGITS) for _ in range(50)} == {0, 3}


def test_llama_cpp_plain_greedy_takes_the_chains_token_without_it(smollm2):
    """Plain greedy skips llama.cpp's chain; a zero bias forces the chain's greedy on the same prompt."""
    from edge_runtime.backends.llamacpp.sampler import Sampler as ChainSampler

    prompt = smollm2.tokenize("The three largest cities of France are", add_bos=smollm2.info.add_bos)
    plain = SamplingParams(max_tokens=24, temperature=0.0)
    through_chain = SamplingParams(max_tokens=24, temperature=0.0, logit_bias={0: 0.0})
    samplers = [ChainSampler(p, smollm2.info.n_vocab, 64) for p in (plain, through_chain)]
    assert [s.argmax_only for s in samplers] == [True, False]
    for sampler in samplers:
        sampler.close()
    answers = []
    for params in (plain, through_chain):
        smollm2.reset()
        answers.append([e.token for e in smollm2.generate(prompt, params) if e.token is not None])
    assert len(answers[0]) > 8 and answers[0] == answers[1]


class RowContext:
    """The one thing plain greedy reads from a llama.cpp context: a logits row."""

    def __init__(self, row: list[float]) -> None:
        self.row = np.array(row, dtype=np.float32)

    def logits_row(self, index: int, n_vocab: int) -> np.ndarray:
        return self.row


def test_plain_greedy_resolves_nan_as_llama_cpps_strict_comparison():
    from edge_runtime.backends.llamacpp.sampler import Sampler as ChainSampler

    greedy = ChainSampler(SamplingParams(temperature=0), 4, 64)
    nan = float("nan")
    assert greedy.sample(RowContext([0.0, 2.0, 2.0, 1.0]), 0) == 1  # ties: the first
    assert greedy.sample(RowContext([0.0, nan, 2.0, 1.0]), 0) == 2  # a NaN never wins over a number
    assert greedy.sample(RowContext([nan, 5.0, 2.0, 1.0]), 0) == 0  # nothing beats a NaN at index 0
    assert greedy.sample(RowContext([nan, nan, nan, nan]), 0) == 0


def test_token_bytes_fall_back_when_llguidance_cannot_read_the_tokenizer():
    from edge_runtime.backends.constraints import GrammarCompiler

    built = []

    def unreadable():
        built.append(1)
        raise ValueError("an unknown pre-tokenizer")

    compiler = GrammarCompiler(unreadable, 8)
    assert compiler.token_bytes(3) is None and compiler.token_bytes(4) is None
    assert built == [1]  # tried once, not once per token
