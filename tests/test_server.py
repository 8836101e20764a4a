"""A real `edgert serve` process on 127.0.0.1, driven by the official openai client and httpx."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from edge_runtime.local_server import LOOPBACK, ServerNotReady, free_port, running_server

GREEDY = {"temperature": 0, "max_tokens": 24}


@contextmanager
def edgert_server(edgert_cmd, *args: str):
    """A real `edgert serve` on a free loopback port, ready (its /health answers); yields its base URL."""
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    with running_server([*edgert_cmd, "serve", "--port", str(port), *args], f"{base}/health", timeout=120):
        yield base


def test_a_server_that_exits_while_starting_is_reported_with_its_output():
    argv = [sys.executable, "-c", "import sys; print('no model here', flush=True); sys.exit(3)"]
    with (
        pytest.raises(ServerNotReady, match="exited with status 3") as failed,
        running_server(argv, f"http://{LOOPBACK}:{free_port()}/health", timeout=60),
    ):
        pass
    assert "no model here" in str(failed.value)


@pytest.fixture(scope="module")
def server(edgert_cmd):
    with edgert_server(edgert_cmd, "--parallel", "4", "--ctx", "1024", "--threads", "2") as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


def ask(client, model_id, text, **kw):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": text}], **kw)


def test_models_health_and_metrics(server, model_id):
    assert model_id == "SmolLM2-135M-Instruct-Q4_1"
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server}/metrics")
    assert metrics.status_code == 200 and "edgert_queue_depth" in metrics.text
    assert "access-control-allow-origin" not in metrics.headers


def test_chat_non_streaming_with_usage(client, model_id):
    reply = ask(client, model_id, "What is the capital of France?", **GREEDY)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    u = reply.usage
    assert u.prompt_tokens > 10 and 0 < u.completion_tokens <= 24
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_streaming_gives_the_same_greedy_answer(client, model_id):
    whole = ask(client, model_id, "Name three colours.", **GREEDY)
    stream = ask(client, model_id, "Name three colours.", stream=True, stream_options={"include_usage": True},
                 **GREEDY)
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_a_second_turn_reuses_the_cached_prompt(server, client, model_id):
    first = [{"role": "user", "content": "Tell me about rivers."}]
    reply = client.chat.completions.create(model=model_id, messages=first, **GREEDY)
    before = _metric(server, "edgert_cached_prompt_tokens_total")
    follow = first + [{"role": "assistant", "content": reply.choices[0].message.content},
                      {"role": "user", "content": "And lakes?"}]
    client.chat.completions.create(model=model_id, messages=follow, **GREEDY)
    assert _metric(server, "edgert_cached_prompt_tokens_total") - before >= reply.usage.prompt_tokens


def test_text_completions_and_stop_sequences(client, model_id):
    free = client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    assert " 6" in free.choices[0].text
    stopped = client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                        stop=[" 6"])
    assert stopped.choices[0].finish_reason == "stop"
    assert " 6" not in stopped.choices[0].text and free.choices[0].text.startswith(stopped.choices[0].text)
    streamed = client.completions.create(model="default", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == free.choices[0].text


def test_seeded_sampling_is_reproducible(client, model_id):
    kw = {"temperature": 1.0, "max_tokens": 16, "seed": 1234}
    a = ask(client, model_id, "Invent a word.", **kw).choices[0].message.content
    b = ask(client, model_id, "Invent a word.", **kw).choices[0].message.content
    assert a == b


@pytest.mark.parametrize("body,status,code", [
    (b"{not json", 400, None),
    (json.dumps({"messages": "hi"}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}).encode(), 400, None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}).encode(), 400, None),
    (json.dumps({"messages": []}).encode(), 400, None),
    (json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404,
     "model_not_found"),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 3000}]}).encode(), 400,
     "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}).encode(), 400,
     "context_length_exceeded"),
    (json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode(), 413, "body_too_large"),
])
def test_bad_requests_get_openai_errors_never_500(server, body, status, code):
    res = httpx.post(f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                     timeout=60)
    assert res.status_code == status, res.text
    error = res.json()["error"]
    assert error["message"] and error["type"]
    if code:
        assert error["code"] == code


def test_unknown_routes_and_methods(server):
    assert httpx.get(f"{server}/v1/nothing").status_code == 404
    assert httpx.get(f"{server}/v1/chat/completions").status_code == 405


def test_eight_concurrent_streams_are_all_answered_completely(client, model_id):
    results: dict[int, tuple[str, str | None, int]] = {}

    def one(i: int) -> None:
        stream = ask(client, model_id, f"Write a sentence about the number {i}.", stream=True,
                     stream_options={"include_usage": True}, temperature=0, max_tokens=32)
        text, finish, tokens = [], None, 0
        for chunk in stream:
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        results[i] = ("".join(text), finish, tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(8))
    for text, finish, tokens in results.values():
        assert text.strip() and finish in ("stop", "length") and tokens >= 1
        assert finish == "stop" or tokens == 32


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_client_that_disconnects_frees_its_slot(edgert_cmd):
    with edgert_server(edgert_cmd, "--parallel", "1", "--ctx", "2048") as base:
        body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1500, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as res:
            assert res.status_code == 200
            for _ in zip(range(3), res.iter_lines(), strict=False):
                pass
        deadline = time.monotonic() + 30  # a hang guard; the slot frees within one token
        while _metric(base, "edgert_slots_busy") != 0:
            assert time.monotonic() < deadline, "the slot was not freed"
            time.sleep(0.05)
        assert _metric(base, 'edgert_generations_finished_total{reason="cancelled"}') == 1
        reply = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
        generated = _metric(base, "edgert_generated_tokens_total")
        assert generated < 1500  # the first answer really stopped


def test_queue_overflow_gives_429_with_retry_after(edgert_cmd):
    with edgert_server(edgert_cmd, "--parallel", "1", "--queue", "1", "--ctx", "2048",
                        "--queue-timeout", "600") as base:
        body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 120, "temperature": 0, "stream": True}
        statuses: list[int] = []
        started = threading.Event()

        def long_request() -> None:
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as res:
                statuses.append(res.status_code)
                started.set()
                for _ in res.iter_lines():
                    pass

        first = threading.Thread(target=long_request)
        first.start()
        assert started.wait(60)
        second = threading.Thread(target=long_request)  # waits in the queue
        second.start()
        deadline = time.monotonic() + 30
        while _metric(base, "edgert_queue_depth") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        third = httpx.post(f"{base}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)
        assert third.status_code == 429
        assert third.headers["retry-after"].isdigit() and third.json()["error"]["type"] == "rate_limit_error"
        first.join(600)
        second.join(600)
        assert statuses == [200, 200]  # the queued request was answered, not dropped


def test_api_key_guards_everything_but_health(edgert_cmd, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    with edgert_server(edgert_cmd, "--parallel", "1", "--ctx", "512", "--api-key-file", str(key_file)) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data
        bad = openai.OpenAI(base_url=f"{base}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


def test_binding_beyond_loopback_without_a_key_is_refused_before_loading(edgert_cmd):
    res = subprocess.run([*edgert_cmd, "serve", "--host", "0.0.0.0", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 1
    assert res.stderr.startswith("error: binding 0.0.0.0") and "--api-key" in res.stderr
    assert "plan:" not in res.stderr  # refused before the model was planned or loaded
