"""The response cache: the store on disk, the key, replays on real llama.cpp, `edgert run` and a real server."""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path

import httpx
import openai
import pytest

from edge_runtime.backends.base import Grammar, SamplingParams, Settings
from edge_runtime.local_server import LOOPBACK, free_port, running_server
from edge_runtime.models.artifact import Artifact
from edge_runtime.models.response_cache import ResponseCache, response_key
from edge_runtime.server.response_replay import CachedResponses, ResponseCachedModel, sampling_fields

SHA = "ab" * 32
GREEDY = SamplingParams(temperature=0, max_tokens=12)


def _key(**change) -> str:
    parts = {"artifact_sha256": SHA, "settings": Settings().to_dict(), "prompt": [1, 2, 3],
             "sampling": sampling_fields(GREEDY), **change}
    return response_key(**parts)


# -- the store ------------------------------------------------------------------------------------

def test_a_stored_entry_comes_back_and_a_missing_one_is_none(tmp_path):
    cache = ResponseCache(tmp_path / "rc")
    key = _key()
    assert cache.get(key) is None
    assert cache.put(key, {"events": [{"token": 5, "text": "hi"}]})
    assert cache.get(key)["events"] == [{"token": 5, "text": "hi"}]
    assert not list((tmp_path / "rc").glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("damage", [b"{\"events\": [", b"\xff\xfe", b"[]", b"{\"format\": 1, \"key\": \"other\"}"])
def test_a_damaged_entry_is_ignored_and_removed(tmp_path, damage):
    cache = ResponseCache(tmp_path)
    key = _key()
    cache.put(key, {"events": []})
    path = tmp_path / f"{key}.json"
    path.write_bytes(damage)
    assert cache.get(key) is None
    assert not path.exists()


def test_the_bound_evicts_the_least_recently_used(tmp_path):
    cache = ResponseCache(tmp_path, max_bytes=2000)
    keys = [_key(prompt=[i]) for i in range(5)]  # an entry takes about 530 bytes: three fit
    for age, key in enumerate(keys[:3]):
        cache.put(key, {"events": [{"text": "x" * 400}]})
        os.utime(tmp_path / f"{key}.json", (1000 + age, 1000 + age))  # distinct ages, oldest first
    assert cache.get(keys[0]) is not None  # used now: the most recent
    for key in keys[3:]:
        cache.put(key, {"events": [{"text": "x" * 400}]})
    assert cache.size_bytes() <= 2000
    assert cache.get(keys[1]) is None and cache.get(keys[2]) is None  # the least recently used went
    assert cache.get(keys[0]) is not None and cache.get(keys[4]) is not None
    assert not cache.put(_key(prompt=[99]), {"events": [{"text": "y" * 5000}]})  # larger than the bound


# -- the key --------------------------------------------------------------------------------------

CHANGED = {"max_tokens": 13, "temperature": 0.5, "top_k": 7, "top_p": 0.5, "min_p": 0.2, "repeat_penalty": 1.1,
           "repeat_last_n": 8, "presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {5: 1.0},
           "seed": 3, "stop": ("\n",), "logprobs": 2, "json_schema": {"type": "object"},
           "grammar": Grammar("regex", r"\d+")}


def test_the_key_changes_with_every_input():
    base = _key()
    assert _key() == base  # stable
    assert set(CHANGED) == {f.name for f in fields(SamplingParams)}, "a new sampling parameter needs a case here"
    keys = {base, _key(artifact_sha256="cd" * 32), _key(settings=Settings(n_ctx=1024).to_dict()),
            _key(settings=Settings(type_k="q8_0").to_dict()), _key(prompt=[1, 2, 4]), _key(prompt=[1, 2])}
    for name, value in CHANGED.items():
        keys.add(_key(sampling=sampling_fields(replace(GREEDY, **{name: value}))))
    keys.add(_key(sampling=sampling_fields(replace(GREEDY, grammar="start: /[a-z]+/"))))
    keys.add(_key(sampling=sampling_fields(replace(GREEDY, json_schema={"type": "array"}))))
    assert len(keys) == 6 + len(CHANGED) + 2


def test_only_greedy_requests_have_a_key(tmp_path, smollm2_path):
    cached = CachedResponses(Artifact(str(smollm2_path), "gguf", "smollm2", sha256=SHA), Settings(), tmp_path)
    assert cached.key([1, 2], GREEDY) is not None
    assert cached.key([1, 2], replace(GREEDY, temperature=0.7)) is None


@pytest.mark.parametrize("events", [
    [{"text": "hi"}, {"token": True, "text": "!"}],  # a bool is no token id
    [{"token": 5, "text": "hi", "top": [["x", 1.0]]}],  # an alternative named by text, not id
    [{"token": 5, "text": "hi", "logprob": "low"}],
    [{"token": 5}],  # no text
    [],
])
def test_an_entry_that_reads_back_but_cannot_be_replayed_is_a_miss_and_removed(tmp_path, smollm2_path, events):
    cached = CachedResponses(Artifact(str(smollm2_path), "gguf", "smollm2", sha256=SHA), Settings(), tmp_path)
    key = cached.key([1, 2], GREEDY)
    cached.store.put(key, {"events": events, "finish_reason": "stop", "gen_tokens": 1})
    assert cached.store.get(key) is not None  # valid JSON of its own key: the store keeps it
    assert cached.lookup(key) is None
    assert cached.store.get(key) is None


def test_the_key_names_the_code_that_computes_the_answer(tmp_path, smollm2_path):
    from edge_runtime.server.response_replay import runtime_versions

    cached = CachedResponses(Artifact(str(smollm2_path), "gguf", "smollm2", sha256=SHA), Settings(), tmp_path)
    assert cached.settings["versions"] == runtime_versions()
    assert runtime_versions()["llama-cpp-python"] and runtime_versions()["edge-runtime"]


# -- replays on real llama.cpp ---------------------------------------------------------------------

def _events(stream):
    return [(e.token, e.text, e.finish_reason, e.logprob, e.top_logprobs) for e in stream]


def test_a_repeat_is_replayed_with_the_same_tokens_reason_and_prompt_length(tmp_path, smollm2, smollm2_path):
    cached = CachedResponses(Artifact(str(smollm2_path), "gguf", "smollm2", sha256=SHA), smollm2_settings(),
                             tmp_path)
    model = ResponseCachedModel(smollm2, cached)
    tokens = smollm2.tokenize("The capital of France is", add_bos=True)
    params = replace(GREEDY, logprobs=2)
    first = list(model.generate(tokens, params))
    assert model.last_hit is False
    again = list(model.generate(tokens, params))
    assert model.last_hit is True
    assert _events(again) == _events(first)  # logprobs are deterministic: kept and replayed
    stats, computed = again[-1].stats, first[-1].stats
    assert stats.prompt_tokens == computed.prompt_tokens == len(tokens)
    assert stats.gen_tokens == computed.gen_tokens and stats.evaluated_tokens == 0
    assert stats.cached_tokens == len(tokens) and stats.prefill_s == 0.0
    # Another prompt, or sampling, is computed, never answered from the entry.
    list(model.generate(tokens[:-1], params))
    assert model.last_hit is False
    list(model.generate(tokens, replace(params, temperature=0.8, seed=1)))
    assert model.last_hit is None


def smollm2_settings() -> Settings:
    return Settings(n_ctx=2048, n_threads=2)


# -- edgert run and a real server ------------------------------------------------------------------

def test_edgert_run_replays_a_repeat(edgert_cmd, tmp_path):
    env = {**os.environ, "EDGERT_HOME": str(tmp_path)}
    argv = [*edgert_cmd, "run", "Count: 1, 2, 3,", "--temp", "0", "--max-tokens", "8", "--ctx", "512",
            "--threads", "2", "--response-cache", "--json"]
    first = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
    again = json.loads(subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout)
    assert (first["response_cache"], again["response_cache"]) == ("miss", "hit")
    assert again["text"] == first["text"] and again["finish_reason"] == first["finish_reason"]
    assert again["stats"]["prompt_tokens"] == first["stats"]["prompt_tokens"]
    assert again["stats"]["evaluated_tokens"] == 0
    assert list((tmp_path / "response-cache").glob("*.json"))


@contextmanager
def _server(edgert_cmd, home: Path, *args: str):
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    env_home = os.environ.get("EDGERT_HOME")
    os.environ["EDGERT_HOME"] = str(home)  # the child inherits it: its cache goes under tmp_path
    try:
        argv = [*edgert_cmd, "serve", "--port", str(port), "--ctx", "1024", "--threads", "2", "--parallel", "2",
                *args]
        with running_server(argv, f"{base}/health", timeout=120):
            yield base
    finally:
        if env_home is not None:
            os.environ["EDGERT_HOME"] = env_home


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_server_with_the_cache_counts_hits_and_misses_and_replays_streams(edgert_cmd, tmp_path):
    with _server(edgert_cmd, tmp_path, "--response-cache") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        ask = {"model": "default", "messages": [{"role": "user", "content": "Name a colour."}],
               "temperature": 0, "max_tokens": 16}
        first = client.chat.completions.create(**ask)
        assert (_metric(base, "edgert_response_cache_hits_total"),
                _metric(base, "edgert_response_cache_misses_total")) == (0, 1)
        again = client.chat.completions.create(**ask)
        assert _metric(base, "edgert_response_cache_hits_total") == 1
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.choices[0].finish_reason == first.choices[0].finish_reason
        assert again.usage.prompt_tokens == first.usage.prompt_tokens
        assert again.usage.completion_tokens == first.usage.completion_tokens
        assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens

        chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        assert _metric(base, "edgert_response_cache_hits_total") == 2
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == first.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == first.choices[0].finish_reason
        assert chunks[-1].usage.prompt_tokens == first.usage.prompt_tokens

        client.chat.completions.create(**{**ask, "temperature": 0.9})  # not deterministic: neither counted
        assert (_metric(base, "edgert_response_cache_hits_total"),
                _metric(base, "edgert_response_cache_misses_total")) == (2, 1)


def test_cached_tokens_show_in_openai_usage(edgert_cmd, tmp_path):
    """Without the response cache, a repeat reuses the prompt's prefix in the KV cache."""
    with _server(edgert_cmd, tmp_path, "--parallel", "1") as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        assert _metric(base, "edgert_response_cache_misses_total") == 0  # off: never counted
        ask = {"model": "default", "messages": [{"role": "user", "content": "Tell me about rivers."}],
               "temperature": 0, "max_tokens": 8}
        first = client.chat.completions.create(**ask)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        again = client.chat.completions.create(**ask)
        assert 0 < again.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens
        stream = client.completions.create(model="default", prompt="Tell me about rivers.", max_tokens=4,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        usage = [c.usage for c in stream if c.usage][-1]
        assert usage.prompt_tokens_details.cached_tokens >= 0 and usage.prompt_tokens > 0
        whole = client.completions.create(model="default", prompt="Tell me about rivers.", max_tokens=4,
                                          temperature=0)
        assert 0 < whole.usage.prompt_tokens_details.cached_tokens <= whole.usage.prompt_tokens
