"""Ollama's API on the real server on SmolLM2, driven by the official ``ollama`` client and httpx."""

from __future__ import annotations

import json
import subprocess

import httpx
import ollama
import pytest
from pydantic import BaseModel, ConfigDict, Field
from test_server_openai_latest import latest_release_python
from test_server_safety import serving, smollm2_loader

from edge_runtime.server.state import ServerConfig

HI = [{"role": "user", "content": "Say hello in five words."}]
GREEDY = {"temperature": 0, "num_predict": 16}


class Capital(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=24)
    certain: bool


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(model_id="smollm2", parallel=2, queue_size=16)
    with serving(config, smollm2_loader(smollm2_path, n_ctx=1024, n_parallel=2)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server, timeout=600)


def _truthful_counts(reply) -> None:
    assert reply.done and reply.done_reason in ("stop", "length")
    assert 0 < reply.eval_count <= GREEDY["num_predict"]
    assert reply.prompt_eval_count >= 0 and reply.total_duration > 0
    assert reply.eval_duration > 0 and reply.total_duration >= reply.eval_duration


def test_chat_and_its_stream_say_the_same(client):
    whole = client.chat(model="smollm2", messages=HI, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and whole.message.content.strip()
    _truthful_counts(whole)
    parts = list(client.chat(model="smollm2:latest", messages=HI, options=GREEDY, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content
    _truthful_counts(parts[-1])
    assert parts[-1].eval_count == whole.eval_count


def test_generate_whole_and_streamed(client):
    whole = client.generate(model="default", prompt="The capital of France is", options=GREEDY, stream=False)
    assert whole.response.strip()
    _truthful_counts(whole)
    parts = list(client.generate(model="smollm2", prompt="The capital of France is", options=GREEDY, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model="smollm2", prompt="The capital of France is", raw=True, options=GREEDY,
                          stream=False)
    assert raw.response and raw.eval_count > 0


def test_format_with_a_schema_gives_valid_json(client):
    prompt = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    reply = client.chat(model="smollm2", messages=prompt, format=Capital.model_json_schema(),
                        options={"temperature": 0, "num_predict": 60})
    assert reply.done_reason == "stop"
    assert Capital.model_validate_json(reply.message.content).city
    free = client.chat(model="smollm2", messages=prompt, format="json", options={"temperature": 0, "num_predict": 60})
    assert free.done_reason != "stop" or isinstance(json.loads(free.message.content), dict)


def test_tool_history_in_ollamas_shape_is_read(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "required": ["city"],
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18 degrees and sunny", "tool_name": "get_weather"}]
    reply = client.chat(model="smollm2", messages=messages, tools=tools, options=GREEDY)
    assert reply.done
    for call in reply.message.tool_calls or []:  # any call it makes is in Ollama's shape
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_list_show_and_ps(client):
    listed = client.list().models
    assert [m.model for m in listed] == ["smollm2:latest"]
    assert listed[0].details.format == "gguf" and listed[0].details.family and listed[0].size > 0
    shown = client.show("smollm2")
    assert shown.modelinfo["general.architecture"] == listed[0].details.family
    assert shown.details.parameter_size.endswith("M") and "tools" in shown.capabilities
    running = client.ps().models
    assert running[0].model == "smollm2:latest" and running[0].expires_at is not None


def test_errors_are_ollamas_shape(client, server):
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="llama3", messages=HI)
    assert missing.value.status_code == 404 and missing.value.error == "model 'llama3' not found"
    with pytest.raises(ollama.ResponseError) as wrong:
        client.chat(model="smollm2", messages=HI, options={"temperature": "hot"})
    assert wrong.value.status_code == 400 and "options.temperature" in wrong.value.error
    for body in (b"{", b"", b"[1]"):
        res = httpx.post(f"{server}/api/chat", content=body, timeout=60)
        assert res.status_code == 400 and isinstance(res.json()["error"], str)
    with pytest.raises(ollama.ResponseError) as thinking:
        client.chat(model="smollm2", messages=HI, think=True)
    assert thinking.value.status_code == 400 and "thinking" in thinking.value.error
    bad_format = httpx.post(f"{server}/api/generate", json={"model": "smollm2", "prompt": "hi", "format": 3})
    assert bad_format.status_code == 400 and bad_format.json()["error"].startswith("invalid format")


def test_logprobs_whole_and_streamed(client, server):
    """Ollama 0.12's logprobs: the chosen token's, and its top alternatives, the chosen first under greedy."""
    whole = client.chat(model="smollm2", messages=HI, options=GREEDY, logprobs=True, top_logprobs=3)
    assert whole.logprobs and "".join(p.token for p in whole.logprobs) == whole.message.content
    for p in whole.logprobs:
        assert p.logprob <= 0 and len(p.top_logprobs) == 3
        assert p.top_logprobs[0].token == p.token and abs(p.top_logprobs[0].logprob - p.logprob) < 1e-5
    streamed = [p for chunk in client.chat(model="smollm2", messages=HI, options=GREEDY, logprobs=True,
                                           top_logprobs=3, stream=True) for p in chunk.logprobs or ()]
    rounded = [(p.token, round(p.logprob, 4)) for p in whole.logprobs]
    assert [(p.token, round(p.logprob, 4)) for p in streamed] == rounded
    generated = client.generate(model="smollm2", prompt="The capital of France is", options=GREEDY, logprobs=True)
    assert generated.logprobs and all(p.top_logprobs == [] for p in generated.logprobs)
    assert client.chat(model="smollm2", messages=HI, options=GREEDY).logprobs is None
    lone = httpx.post(f"{server}/api/chat",
                      json={"model": "smollm2", "messages": HI, "top_logprobs": 2, "stream": False})
    assert lone.status_code == 400 and "logprobs" in lone.json()["error"]


def test_unknown_and_retired_options_are_ignored(client):
    reply = client.chat(model="smollm2", messages=HI,
                        options={**GREEDY, "mirostat": 1, "num_ctx": 2048, "not_an_option": True, "seed": -1})
    assert reply.done and reply.message.content


def test_stream_is_the_default_and_ndjson(server):
    body = {"model": "smollm2", "messages": HI, "options": GREEDY, "keep_alive": "5m"}
    with httpx.stream("POST", f"{server}/api/chat", json=body, timeout=600) as res:
        assert res.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in res.iter_lines()]
    assert len(lines) > 1 and lines[-1]["done"] and all(not line["done"] for line in lines[:-1])
    assert isinstance(lines[-1]["eval_duration"], int) and lines[-1]["created_at"].endswith("Z")


def test_probe_version_and_load_requests(server):
    assert httpx.get(f"{server}/").text == "Ollama is running"
    assert httpx.get(f"{server}/api/version").json()["version"].count(".") == 2
    load = httpx.post(f"{server}/api/generate", json={"model": "smollm2"}).json()
    assert load["done"] and load["done_reason"] == "load" and load["response"] == ""
    unload = httpx.post(f"{server}/api/chat", json={"model": "smollm2", "messages": [], "keep_alive": 0}).json()
    assert unload["done_reason"] == "unload" and unload["message"]["role"] == "assistant"


NEWEST_CLIENT = r'''
import json, sys

import ollama

client = ollama.Client(host=sys.argv[1], timeout=600)
hi = [{"role": "user", "content": "Say hello in five words."}]
greedy = {"temperature": 0, "num_predict": 16}
out = {"version": ollama.__version__ if hasattr(ollama, "__version__") else ""}
out["chat"] = client.chat(model="smollm2", messages=hi, options=greedy).message.content
out["stream"] = "".join(p.message.content for p in client.chat(model="smollm2", messages=hi, options=greedy,
                                                                stream=True))
out["generate"] = client.generate(model="smollm2", prompt="The capital of France is", options=greedy).response
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24}}, "required": ["city"]}
ask = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
out["format"] = client.chat(model="smollm2", messages=ask, format=schema,
                            options={"temperature": 0, "num_predict": 40}).message.content
out["list"] = [m.model for m in client.list().models]
out["show"] = client.show("smollm2").modelinfo["general.architecture"]
print(json.dumps(out))
'''


def test_the_newest_ollama_client(request, server):
    python = latest_release_python(request, "ollama")
    run = subprocess.run([str(python), "-c", NEWEST_CLIENT, server], capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["chat"] and out["stream"] == out["chat"] and out["generate"]
    assert isinstance(json.loads(out["format"])["city"], str)
    assert out["list"] == ["smollm2:latest"] and out["show"]
