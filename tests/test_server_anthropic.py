"""Anthropic's Messages API on the real server on SmolLM2, driven by the official ``anthropic`` SDK and httpx."""

from __future__ import annotations

import json
import subprocess

import anthropic
import httpx
import pytest
from test_server_openai_latest import latest_release_python
from test_server_safety import serving, smollm2_loader

from edge_runtime.server.state import ServerConfig

KEY = "s3cret"
HI = [{"role": "user", "content": "Say hello in five words."}]
WEATHER = {"name": "get_weather", "description": "The weather of a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                            "required": ["city"], "additionalProperties": False}}
APP_ORIGIN = "http://notes.localhost:5173"
CONFIG = ServerConfig(model_id="smollm2", parallel=2, queue_size=16, api_key=KEY, allow_origins=(APP_ORIGIN,))


@pytest.fixture(scope="module")
def server(smollm2_path):
    with serving(CONFIG, smollm2_loader(smollm2_path, n_ctx=1024, n_parallel=2)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=600)


def test_messages_and_the_stream_helpers_agree(client):
    whole = client.messages.create(model="smollm2", max_tokens=16, temperature=0, messages=HI,
                                   system="You are brief.")
    assert whole.role == "assistant" and whole.content[0].type == "text" and whole.content[0].text.strip()
    assert whole.stop_reason in ("end_turn", "max_tokens") and whole.stop_sequence is None
    assert whole.usage.input_tokens > 0 and 0 < whole.usage.output_tokens <= 16
    with client.messages.stream(model="default", max_tokens=16, temperature=0, messages=HI,
                                system=[{"type": "text", "text": "You are brief."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_every_event_is_named_and_in_order(server):
    body = {"model": "smollm2", "max_tokens": 8, "temperature": 0, "messages": HI, "stream": True}
    with httpx.stream("POST", f"{server}/v1/messages?beta=true", json=body, headers={"x-api-key": KEY},
                      timeout=600) as res:
        blocks = res.read().decode().strip().split("\n\n")
    names = [b.splitlines()[0].removeprefix("event: ") for b in blocks]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in names and names.index("content_block_stop") == len(names) - 3
    assert all(b.splitlines()[0].startswith("event: ") for b in blocks)


def test_tool_use_round_trip(client):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.messages.create(model="smollm2", max_tokens=60, temperature=0, messages=ask, tools=[WEATHER],
                                   tool_choice={"type": "any"})
    assert reply.stop_reason == "tool_use"
    use = next(b for b in reply.content if b.type == "tool_use")
    assert use.name == "get_weather" and isinstance(use.input["city"], str) and set(use.input) == {"city"}
    history = [*ask, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in reply.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": "18 degrees and sunny"}]}]
    answer = client.messages.create(model="smollm2", max_tokens=30, temperature=0, messages=history,
                                    tools=[WEATHER], tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens") and answer.content[0].type == "text"
    with client.messages.stream(model="smollm2", max_tokens=60, temperature=0, messages=ask, tools=[WEATHER],
                                tool_choice={"type": "tool", "name": "get_weather"}) as stream:
        streamed = stream.get_final_message()
    call = next(b for b in streamed.content if b.type == "tool_use")
    assert streamed.stop_reason == "tool_use" and call.input == use.input


def test_count_tokens_matches_the_prompt_the_answer_reports(client):
    counted = client.messages.count_tokens(model="smollm2", messages=HI, system="You are brief.")
    reply = client.messages.create(model="smollm2", max_tokens=2, messages=HI, system="You are brief.")
    assert counted.input_tokens == reply.usage.input_tokens > 0
    with_tools = client.messages.count_tokens(model="smollm2", messages=HI, tools=[WEATHER])
    assert with_tools.input_tokens > counted.input_tokens
    # Fields about the answer are let through: clients send the same body to both routes.
    lenient = client.messages.count_tokens(model="smollm2", messages=HI, system="You are brief.",
                                           extra_body={"max_tokens": 5, "stream": False})
    assert lenient.input_tokens == counted.input_tokens


def test_errors_are_anthropics_shape(client, server):
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=8, messages=HI)
    assert missing.value.body["error"]["type"] == "not_found_error"
    res = httpx.post(f"{server}/v1/messages", json={"model": "smollm2", "messages": HI}, headers={"x-api-key": KEY})
    assert res.status_code == 400
    assert res.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                     "message": "max_tokens: Field required"}}
    for bad in ({"temperature": 1.5}, {"frobnicate": 1}, {"tools": [{"type": "web_search_20250305", "name": "w"}]},
                {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}):
        res = httpx.post(f"{server}/v1/messages", json={"model": "smollm2", "max_tokens": 8, "messages": HI, **bad},
                         headers={"x-api-key": KEY})
        assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error", bad
    newer_sdk = {"speed": "standard", "workspace_id": "wrkspc_1", "user_profile_id": "u1",  # anthropic 2.x
                 "diagnostics": {"previous_message_id": "msg_1"}}
    accepted = client.messages.create(model="smollm2", max_tokens=2, messages=HI, metadata={"user_id": "u1"},
                                      thinking={"type": "disabled"}, extra_body=newer_sdk)
    assert accepted.usage.output_tokens > 0


def test_the_key_comes_as_x_api_key_or_bearer(server):
    body = {"model": "smollm2", "max_tokens": 2, "messages": HI}
    assert httpx.post(f"{server}/v1/messages", json=body, timeout=600).status_code == 401
    assert httpx.post(f"{server}/v1/messages", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    bearer = anthropic.Anthropic(base_url=server, auth_token=KEY, max_retries=0, timeout=600)
    assert bearer.messages.create(**body).usage.output_tokens > 0
    # Elsewhere the key is still only a Bearer token.
    assert httpx.get(f"{server}/v1/models", headers={"x-api-key": KEY}).status_code == 401


def test_a_refused_key_is_answered_in_each_wire_formats_shape(server):
    """The SDKs read their own error shape: Anthropic's raises AuthenticationError, Ollama's shows the text."""
    body = {"model": "smollm2", "max_tokens": 2, "messages": HI}
    wrong = anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0, timeout=60)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        wrong.messages.create(**body)
    assert refused.value.body["type"] == "error" and refused.value.body["error"]["type"] == "authentication_error"
    assert "API key" in refused.value.body["error"]["message"]
    import ollama

    with pytest.raises(ollama.ResponseError) as ollama_refused:
        ollama.Client(host=server, timeout=60).list()
    assert ollama_refused.value.status_code == 401 and "API key" in ollama_refused.value.error
    openai_shape = httpx.get(f"{server}/v1/models").json()
    assert openai_shape["error"]["code"] == "invalid_api_key"


def test_a_page_on_an_allowed_origin_may_send_anthropics_headers(server):
    asked = "x-api-key,anthropic-version,anthropic-dangerous-direct-browser-access,content-type"
    preflight = httpx.options(f"{server}/v1/messages", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": asked})
    assert preflight.status_code == 200
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert all(header in allowed for header in asked.split(","))


def test_stop_sequences_end_the_answer(client):
    free = client.messages.create(model="smollm2", max_tokens=24, temperature=0, messages=HI)
    word = free.content[0].text.split()[1]
    stops = [word, "never in this answer"]
    cut = client.messages.create(model="smollm2", max_tokens=24, temperature=0, messages=HI, stop_sequences=stops)
    assert cut.content[0].text == free.content[0].text[:free.content[0].text.index(word)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == word
    with client.messages.stream(model="smollm2", max_tokens=24, temperature=0, messages=HI,
                                stop_sequences=stops) as stream:
        streamed = stream.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == word
    unmatched = client.messages.create(model="smollm2", max_tokens=24, temperature=0, messages=HI,
                                       stop_sequences=["never in this answer"])
    assert unmatched.stop_sequence is None and unmatched.stop_reason == free.stop_reason



NEWEST_CLIENT = r'''
import json, sys

import anthropic

client = anthropic.Anthropic(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0, timeout=600)
hi = [{"role": "user", "content": "Say hello in five words."}]
greedy = {"temperature": 0}  # 2.x's create() has no temperature argument; the server still reads it
out = {"version": anthropic.__version__}
reply = client.messages.create(model="smollm2", max_tokens=16, extra_body=greedy, messages=hi)
out["message"] = reply.content[0].text
with client.messages.stream(model="smollm2", max_tokens=16, extra_body=greedy, messages=hi) as stream:
    out["stream"] = "".join(stream.text_stream)
weather = {"name": "get_weather", "input_schema": {"type": "object", "required": ["city"],
                                                   "properties": {"city": {"type": "string", "maxLength": 30}}}}
used = client.messages.create(model="smollm2", max_tokens=60, extra_body=greedy, tools=[weather],
                              tool_choice={"type": "any"},
                              messages=[{"role": "user", "content": "What is the weather in Paris?"}])
call = next(b for b in used.content if b.type == "tool_use")
out["tool"] = [used.stop_reason, call.name, call.input]
out["count"] = client.messages.count_tokens(model="smollm2", messages=hi).input_tokens
print(json.dumps(out))
'''


def test_the_newest_anthropic_sdk(request, server):
    python = latest_release_python(request, "anthropic")
    run = subprocess.run([str(python), "-c", NEWEST_CLIENT, server, KEY], capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["message"] and out["stream"] == out["message"] and out["count"] > 0
    stop, name, arguments = out["tool"]
    assert (stop, name) == ("tool_use", "get_weather") and isinstance(arguments["city"], str)
