"""Constrained decoding, logprobs and the sampling knobs on every backend, on the tiny random model.

Its answers are random-weight gibberish, so when one is valid JSON it is the grammar's doing: a
good test of the one constraint engine (``backends.constraints``) each backend drives.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from edge_runtime.backends.base import Grammar, SamplingParams
from edge_runtime.errors import InvalidRequestError

from .streams import N_CTX, PROMPT, collect, run

# Nested objects, an array, enums, an integer and a number, every part bounded so that even a
# random model's answer fits the context.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 6}, "lat": {"type": "number"}},
            "required": ["city", "lat"],
            "additionalProperties": False,
        },
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "tags", "home", "role"],
    "additionalProperties": False,
    "x-guidance": {"whitespace_flexible": False},  # compact: a random model would fill the context with blanks
}


def prompt_tokens(model) -> list[int]:
    return model.tokenize(PROMPT, add_bos=model.info.add_bos)


def test_every_answer_under_a_json_schema_that_stops_is_valid(model):
    prompt = prompt_tokens(model)
    stopped = 0
    for seed in range(20):
        params = SamplingParams(max_tokens=N_CTX - len(prompt) - 1, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                                seed=seed, json_schema=SCHEMA)
        got = run(model, prompt, params)
        if got.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(got.text), SCHEMA)
        else:
            assert got.finish_reason == "length"
            assert got.text == model.detokenize(got.tokens)  # the partial answer, as OpenAI gives it
    assert stopped >= 10, f"only {stopped} of 20 answers ended by themselves"


def test_a_regex_grammar_shapes_the_answer_and_stop_strings_wait_for_its_end(model):
    # A stop string could cut a structure in half: under a grammar only the grammar ends the answer.
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=3, stop=("!",),
                            grammar=Grammar("regex", r"[a-c]{2,5}!"))
    got = run(model, prompt_tokens(model), params)
    assert got.finish_reason == "stop"
    assert 3 <= len(got.text) <= 6 and set(got.text[:-1]) <= set("abc") and got.text.endswith("!"), got.text


def test_a_grammar_that_cannot_compile_is_refused_before_generating(model):
    prompt = prompt_tokens(model)
    with pytest.raises(InvalidRequestError, match="Lark grammar"):
        model.generate(prompt, SamplingParams(grammar="start: undefined_rule"))
    with pytest.raises(InvalidRequestError, match="json_schema"):
        model.generate(prompt, SamplingParams(json_schema={"type": "string", "format": "no-such-format"}))
    assert run(model, prompt).finish_reason in ("stop", "length")  # the model is still fine


def test_max_tokens_cuts_a_constrained_answer_with_length(model):
    got = run(model, prompt_tokens(model), SamplingParams(max_tokens=3, temperature=0.0, json_schema=SCHEMA))
    assert got.finish_reason == "length" and len(got.tokens) == 3
    assert got.text.startswith('{"'), got.text


def test_logprobs_are_the_log_softmax_of_the_raw_logits(model):
    prompt = prompt_tokens(model)
    model.reset()
    got = run(model, prompt, SamplingParams(max_tokens=4, temperature=0.9, seed=5, logprobs=5))
    events = [e for e in got.events if e.token is not None]
    assert len(events) == 4
    for event in events:
        assert event.logprob is not None and event.logprob <= 0
        assert len(event.top_logprobs) == 5
        values = [v for _, v in event.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert event.logprob <= values[0] + 1e-6
    # Independently: the logits of the same positions, from the model's own scoring pass.
    rows = np.concatenate([r for _, r in model.logit_rows(prompt + got.tokens, len(prompt) - 1)])
    for row, event in zip(rows, events, strict=False):  # rows: one more than events (the last token)
        row = row.astype(np.float64)
        expected = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
        assert event.logprob == pytest.approx(expected[event.token], abs=1e-3)
        best = int(np.argmax(expected))
        assert event.top_logprobs[0][0] == best and event.top_logprobs[0][1] == pytest.approx(expected[best], abs=1e-3)


def test_no_logprobs_unless_asked(model):
    got = run(model, prompt_tokens(model), SamplingParams(max_tokens=3, temperature=0.0))
    assert all(e.logprob is None and e.top_logprobs == () for e in got.events)
    chosen_only = run(model, prompt_tokens(model), SamplingParams(max_tokens=3, temperature=0.0, logprobs=0))
    assert all(e.logprob is not None and e.top_logprobs == () for e in chosen_only.events if e.token is not None)


def test_a_logit_bias_against_the_greedy_token_changes_the_choice(model):
    prompt = prompt_tokens(model)
    first = run(model, prompt, SamplingParams(max_tokens=1, temperature=0.0)).tokens[0]
    banned = run(model, prompt, SamplingParams(max_tokens=1, temperature=0.0, logit_bias={first: -100}))
    assert banned.tokens and banned.tokens[0] != first
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        model.generate(prompt, SamplingParams(logit_bias={model.info.n_vocab: 1.0}))


def test_penalties_change_a_repetitive_greedy_answer(model):
    prompt = prompt_tokens(model)
    plain = run(model, prompt, SamplingParams(max_tokens=24, temperature=0.0))
    assert len(set(plain.tokens)) < len(plain.tokens), "the greedy answer repeats itself"  # random weights loop
    for knob in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        params = SamplingParams(max_tokens=24, temperature=0.0, repeat_last_n=-1, **knob)
        penalized = collect(model.generate(prompt, params))
        assert penalized.tokens != plain.tokens, knob
        assert len(set(penalized.tokens)) > len(set(plain.tokens)), knob
