"""What OpenAI apps send, against the real server on SmolLM2: structured output, logprobs, the
sampling knobs, and the field table (nothing silently dropped)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from test_server_safety import serving, smollm2_loader

from edge_runtime.server.openai_fields import CHAT_FIELDS, COMPLETION_FIELDS, REFUSED
from edge_runtime.server.state import ServerConfig

HI = [{"role": "user", "content": "Say hello."}]


class Capital(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=24)
    certain: bool


CAPITAL_PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in JSON with the keys "
                                              '"city" (a string) and "certain" (true or false).'}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(model_id="smollm2", parallel=2, queue_size=16)
    with serving(config, smollm2_loader(smollm2_path, n_ctx=1024, n_parallel=2)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=600)


def post(server: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}/v1/{path}", json=body, timeout=600)


# -- structured output ---------------------------------------------------------------------------

def test_parse_gets_a_validated_object(client):
    reply = client.chat.completions.parse(model="default", messages=CAPITAL_PROMPT, response_format=Capital,
                                          temperature=0, max_tokens=60)
    parsed = reply.choices[0].message.parsed
    assert isinstance(parsed, Capital) and parsed.city


def test_a_cut_answer_is_reported_as_length_and_parse_says_so(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="default", messages=CAPITAL_PROMPT, response_format=Capital,
                                      temperature=0, max_tokens=3)
    cut = client.chat.completions.create(model="default", messages=CAPITAL_PROMPT, temperature=0, max_tokens=3,
                                         response_format={"type": "json_object"})
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")


def test_json_schema_on_text_completions_and_json_object_when_sampled(server):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    res = post(server, "completions", {"prompt": "Is the sky blue? Answer in JSON: ", "max_tokens": 30,
                                       "temperature": 0, "response_format": {
                                           "type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    assert json.loads(res.json()["choices"][0]["text"]) in ({"answer": "yes"}, {"answer": "no"})
    for seed in range(3):
        body = {"messages": [{"role": "user", "content": "Describe a cat in JSON with a key name."}],
                "response_format": {"type": "json_object"}, "temperature": 0.8, "seed": seed, "max_tokens": 120}
        choice = post(server, "chat/completions", body).json()["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_a_schema_the_grammar_refuses_is_a_400(server):
    bad = {"type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": {"type": "nonsense"}}}
    res = post(server, "chat/completions", {"messages": HI, "max_tokens": 4, "response_format": bad})
    assert res.status_code == 400 and res.json()["error"]["message"], res.text
    res = post(server, "chat/completions", {"messages": HI, "max_tokens": 4, "response_format": {"type": "xml"}})
    assert res.status_code == 400 and res.json()["error"]["param"] == "response_format"


# -- logprobs ------------------------------------------------------------------------------------

def test_chat_logprobs_whole_and_streamed(client):
    kw = {"model": "default", "messages": HI, "temperature": 0, "max_tokens": 8, "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and len(t.top_logprobs) == 3  # whole characters here
        values = [a.logprob for a in t.top_logprobs]
        assert values == sorted(values, reverse=True) and t.logprob == values[0] <= 0  # greedy: the best one
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


def test_logprob_bytes_join_back_to_characters_split_over_tokens(client):
    kw = {"model": "default", "messages": [{"role": "user", "content": "Repeat exactly: 日本語 ✓"}],
          "temperature": 0, "max_tokens": 13, "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert "日本語 ✓" in whole.choices[0].message.content
    assert bytes(b for t in content for b in t.bytes) == whole.choices[0].message.content.encode()
    split = [t for t in content if "\ufffd" in t.token]  # a token holding part of a character
    assert split and all(t.token.encode() != bytes(t.bytes) for t in split)
    streamed = []
    for chunk in client.chat.completions.create(**kw, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [t.bytes for t in streamed] == [t.bytes for t in content]


def test_completion_offsets_count_characters_of_the_joined_bytes():
    from edge_runtime.server.openai_responses import TextLogprobs
    from edge_runtime.server.requests import TokenLogprob

    pieces = [b" \xe6", b"\x97", b"\xa5", b"\xe6\x9c\xac", b" ok"]  # " 日本 ok", 日 split over three tokens
    items = [TokenLogprob(p.decode("utf-8", errors="replace"), -0.5, p) for p in pieces]
    logprobs = TextLogprobs("abc")
    first, rest = logprobs.render(items[:2]), logprobs.render(items[2:])  # offsets run on across chunks
    assert first["text_offset"] + rest["text_offset"] == [3, 4, 4, 5, 6]


def test_completion_logprobs_count_offsets_from_the_prompt(server):
    prompt = "1, 2, 3,"
    choice = post(server, "completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0,
                                          "logprobs": 2}).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"] and len(lp["token_logprobs"]) == 5
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert top[token] == value == max(top.values()) and len(top) <= 3  # greedy: the best; 2 + the one taken
    assert lp["text_offset"][0] == len(prompt)
    assert lp["text_offset"] == [len(prompt) + len("".join(lp["tokens"][:i])) for i in range(5)]
    assert post(server, "completions", {"prompt": prompt, "max_tokens": 1, "logprobs": 6}).status_code == 400


def test_every_choice_says_logprobs_null_when_not_asked(server):
    body = post(server, "chat/completions", {"messages": HI, "max_tokens": 2}).json()
    assert body["choices"][0]["logprobs"] is None
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "stream": True},
                      timeout=600) as res:
        chunks = [json.loads(line[6:]) for line in res.iter_lines() if line.startswith("data: {")]
    assert chunks and all("logprobs" in c["choices"][0] and c["choices"][0]["logprobs"] is None for c in chunks)
    text = post(server, "completions", {"prompt": "Hi", "max_tokens": 2}).json()
    assert text["choices"][0]["logprobs"] is None


# -- sampling knobs --------------------------------------------------------------------------------

def test_logit_bias_pushes_and_bans_tokens(server, smollm2):
    (banana,) = smollm2.tokenize(" banana")
    forced = post(server, "completions", {"prompt": "My favourite fruit is", "max_tokens": 3, "temperature": 0,
                                          "logit_bias": {str(banana): 100}}).json()
    assert forced["choices"][0]["text"] == " banana" * 3
    free = post(server, "completions", {"prompt": "1, 2, 3,", "max_tokens": 1, "temperature": 0}).json()
    (first,) = smollm2.tokenize(free["choices"][0]["text"])
    banned = post(server, "completions", {"prompt": "1, 2, 3,", "max_tokens": 1, "temperature": 0,
                                          "logit_bias": {str(first): -100}}).json()
    assert banned["choices"][0]["text"] != free["choices"][0]["text"]


def test_penalties_and_the_repetition_penalty_alias_are_taken(server):
    body = {"prompt": "a a a a a", "max_tokens": 6, "temperature": 0}
    plain = post(server, "completions", body).json()["choices"][0]["text"]
    penalized = post(server, "completions", {**body, "repetition_penalty": 5.0, "presence_penalty": 2,
                                             "frequency_penalty": 2, "top_k": 5, "min_p": 0.1}).json()
    assert penalized["choices"][0]["text"] != plain


@pytest.mark.parametrize("field,value,param", [
    ("logit_bias", {"x": 1}, "logit_bias"), ("logit_bias", {"5": 101}, "logit_bias.5"),
    ("presence_penalty", 2.5, "presence_penalty"), ("frequency_penalty", -3, "frequency_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"), ("top_logprobs", 3, "top_logprobs"),
    ("logprobs", "yes", "logprobs"),
])
def test_bad_knob_values_are_400s_naming_the_field(server, field, value, param):
    res = post(server, "chat/completions", {"messages": HI, "max_tokens": 2, field: value})
    assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text


def test_a_logit_bias_outside_the_vocabulary_is_a_400(server):
    res = post(server, "chat/completions", {"messages": HI, "max_tokens": 2, "logit_bias": {"99999999": 5}})
    assert res.status_code == 400 and "vocabulary" in res.json()["error"]["message"]


# -- the field table ------------------------------------------------------------------------------

REFUSED_VALUES = {"n": 2, "audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"],
                  "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
                  "moderation": {}, "functions": [{"name": "f"}], "function_call": "auto",
                  "reasoning_effort": "high", "echo": True, "suffix": "x", "best_of": 2}


@pytest.mark.parametrize("path,table", [("chat/completions", CHAT_FIELDS), ("completions", COMPLETION_FIELDS)])
def test_every_refused_field_is_a_400_naming_it(server, path, table):
    base = {"messages": HI} if path.startswith("chat") else {"prompt": "Hi"}
    refused = [name for name, rule in table.items() if rule.handling == REFUSED]
    assert set(refused) <= set(REFUSED_VALUES)
    for name in refused:
        res = post(server, path, {**base, "max_tokens": 2, name: REFUSED_VALUES[name]})
        assert res.status_code == 400, (name, res.text)
        error = res.json()["error"]
        assert error["param"] == name and error["code"] == "unsupported_parameter" and name in error["message"]


def test_unknown_fields_are_refused_and_client_descriptions_accepted(server):
    res = post(server, "chat/completions", {"messages": HI, "max_tokens": 2, "frobnicate": 1})
    assert res.status_code == 400 and res.json()["error"]["param"] == "frobnicate"
    res = post(server, "chat/completions", {"messages": HI, "max_tokens": 2, "stream_options": {"nope": 1}})
    assert res.status_code == 400 and res.json()["error"]["param"] == "stream_options.nope"
    described = {"user": "u1", "metadata": {"k": "v"}, "store": False, "service_tier": "auto",
                 "safety_identifier": "s", "prompt_cache_key": "k", "verbosity": "low", "n": 1,
                 "modalities": ["text"], "reasoning_effort": "minimal", "parallel_tool_calls": True,
                 "audio": None}
    assert post(server, "chat/completions", {"messages": HI, "max_tokens": 2, **described}).status_code == 200


def test_what_a_server_returned_is_accepted_back_in_the_history(client):
    first = client.chat.completions.parse(model="default", messages=CAPITAL_PROMPT, response_format=Capital,
                                          temperature=0, max_tokens=60)
    sent_back = {**first.choices[0].message.model_dump(exclude_unset=True), "annotations": [],
                 "reasoning_content": "x", "audio": None, "function_call": None}
    assert "parsed" in sent_back and "refusal" in sent_back
    history = [*CAPITAL_PROMPT, sent_back, {"role": "user", "content": [{"type": "text", "text": "Thanks!"}]}]
    reply = client.chat.completions.create(model="default", messages=history, temperature=0, max_tokens=4)
    assert reply.choices[0].message.content
