"""The server against hostile callers: web pages (Host, Origin), keys, half-sent requests, leaks.

The real app under uvicorn as ``edgert serve`` runs it (``server.listen``), in a thread, on a free
loopback port, each server with a SmolLM2 of its own (the app closes its model at shutdown);
driven by httpx, raw sockets and the openai client.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import httpx
import openai
import pytest

from edge_runtime.backends.base import Model, Settings
from edge_runtime.local_server import LOOPBACK, free_port
from edge_runtime.server.access import answered_hosts
from edge_runtime.server.app import ServerConfig

APP_ORIGIN = "https://app.example"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BASE_CONFIG = ServerConfig(model_id="smollm2", parallel=2, queue_size=8, allow_origins=(APP_ORIGIN,),
                           allowed_hosts=answered_hosts(LOOPBACK, ["edge.internal"]),
                           header_timeout_s=1.0, body_timeout_s=1.0)


def smollm2_loader(path, n_ctx: int = 1024, n_parallel: int = 2) -> Callable[[], Model]:
    from edge_runtime.backends.llamacpp.model import LlamaCppModel

    return lambda: LlamaCppModel(str(path), Settings(n_ctx=n_ctx, n_threads=2, n_parallel=n_parallel))


@contextmanager
def serving(config: ServerConfig, load_model: Callable[[], Model], *, ready: str = "ok",
            load_embedder: Callable[[Model], Any] | None = None) -> Iterator[str]:
    """The app (with ``load_embedder``'s embedding model, when given) on a free loopback port until
    /health says ``ready``; yields its base URL."""
    from edge_runtime.server.app import create_app
    from edge_runtime.server.listen import uvicorn_server

    port = free_port()
    server = uvicorn_server(create_app(config, load_model, load_embedder), LOOPBACK, port)
    thread = threading.Thread(target=server.run, name="safety-server", daemon=True)
    thread.start()
    base = f"http://{LOOPBACK}:{port}"
    try:
        deadline = time.monotonic() + 120  # a hang guard, not a timing
        while _health(base) != ready:
            assert thread.is_alive() and time.monotonic() < deadline, f"the server did not get to {ready!r}"
            time.sleep(0.1)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"


def _health(base: str) -> str | None:
    try:
        return httpx.get(f"{base}/health", timeout=5).json()["status"]
    except httpx.TransportError:
        return None


def metric(base: str, name: str, headers: dict[str, str] | None = None) -> float:
    """A sample of /metrics; 0 when it has not been counted yet."""
    for line in httpx.get(f"{base}/metrics", headers=headers, timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def requests_counted(base: str, endpoint: str, status: int, headers: dict[str, str] | None = None) -> float:
    return metric(base, f'edgert_requests_total{{endpoint="{endpoint}",status="{status}"}}', headers)


@pytest.fixture(scope="module")
def server(smollm2_path) -> Iterator[str]:
    with serving(BASE_CONFIG, smollm2_loader(smollm2_path)) as base:
        yield base


def post_chat(base: str, body: bytes | dict, headers: dict[str, str] | None = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{base}/v1/chat/completions", content=content, headers=headers, timeout=120)


# -- web pages: Host and Origin ----------------------------------------------------------------

def test_a_rebound_host_is_refused_even_for_a_plain_text_post(server):
    # The curl: a browser sends text/plain cross-site without a preflight.
    before = requests_counted(server, "chat", 403)
    res = post_chat(server, CHAT, {"Host": "evil.example.com", "Content-Type": "text/plain"})
    assert res.status_code == 403
    assert "\n" not in res.text and res.json()["error"]["code"] == "host_not_allowed"
    assert "evil.example.com" in res.json()["error"]["message"]
    assert requests_counted(server, "chat", 403) == before + 1


@pytest.mark.parametrize("host", ["localhost", "localhost:8080", "LocalHost.", "127.0.0.1:1", "[::1]:8080", "[::1]",
                                  "edge.internal", "edge.internal:9000"])
def test_loopback_names_and_allowed_hosts_are_answered(server, host):
    assert httpx.get(f"{server}/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["localhost.evil.example", "127.0.0.1.nip.io", "evil.example.com:8080", "[::2]:80",
                                  "10.0.0.1"])
def test_other_hosts_are_refused(server, host):
    res = httpx.get(f"{server}/v1/models", headers={"Host": host})
    assert res.status_code == 403 and res.json()["error"]["code"] == "host_not_allowed"


def test_curl_without_an_origin_works_with_any_content_type(server):
    res = post_chat(server, CHAT, {"Content-Type": "text/plain"})
    assert res.status_code == 200 and res.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "https://app.example.evil.example"])
def test_a_web_origin_not_allowed_is_refused(server, origin):
    res = post_chat(server, CHAT, {"Origin": origin, "Content-Type": "text/plain"})
    assert res.status_code == 403 and res.json()["error"]["code"] == "origin_not_allowed"
    assert "access-control-allow-origin" not in res.headers
    preflight = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403


def test_an_allowed_origin_gets_cors_headers(server):
    res = post_chat(server, CHAT, {"Origin": APP_ORIGIN})
    assert res.status_code == 200 and res.headers["access-control-allow-origin"] == APP_ORIGIN
    preflight = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == APP_ORIGIN


def test_which_hosts_a_bind_answers():
    loopback = answered_hosts("127.0.0.1")
    assert loopback is not None and {"localhost", "127.0.0.1", "::1"} <= loopback
    assert "192.168.1.5" in answered_hosts("192.168.1.5", ["box.lan"])
    # Beyond loopback a key guards the server and clients use any name of the machine...
    assert answered_hosts("0.0.0.0") is None and answered_hosts("192.168.1.5") is None
    # ...unless --allow-host names the ones to answer.
    named = answered_hosts("0.0.0.0", ["Box.LAN:8080"])
    assert named is not None and "box.lan" in named and "localhost" in named and "0.0.0.0" not in named


# -- the API key ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def keyed_server(smollm2_path) -> Iterator[str]:
    with serving(replace(BASE_CONFIG, api_key="s3cret"), smollm2_loader(smollm2_path, n_parallel=1)) as base:
        yield base


@pytest.mark.parametrize("authorization,status", [
    ("Bearer s3cret", 200), ("bearer s3cret", 200), ("BEARER   s3cret", 200), ("Bearer wrong", 401),
    ("Basic s3cret", 401), ("s3cret", 401), ("Bearer", 401), (None, 401),
])
def test_the_bearer_scheme_is_case_insensitive(keyed_server, authorization, status):
    headers = {"Authorization": authorization} if authorization else {}
    res = httpx.get(f"{keyed_server}/v1/models", headers=headers)
    assert res.status_code == status
    if status == 401:
        assert res.json()["error"]["code"] == "invalid_api_key" and res.headers["www-authenticate"] == "Bearer"


def test_every_route_but_health_needs_the_key(keyed_server):
    key = {"Authorization": "bearer s3cret"}
    before = requests_counted(keyed_server, "other", 401, key)
    assert httpx.get(f"{keyed_server}/health").json() == {"status": "ok"}
    for path in ("/metrics", "/v1/models", "/v1/nothing", "/health/../metrics"):
        assert httpx.get(f"{keyed_server}{path}").status_code == 401, path
    assert post_chat(keyed_server, CHAT).status_code == 401
    assert httpx.get(f"{keyed_server}/v1/nothing", headers=key).status_code == 404
    assert requests_counted(keyed_server, "other", 401, key) == before + 1
    client = openai.OpenAI(base_url=f"{keyed_server}/v1", api_key="s3cret", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model="default", messages=CHAT["messages"], max_tokens=2)
    assert reply.choices[0].message.role == "assistant"


# -- what /health tells -------------------------------------------------------------------------

def test_health_says_only_the_state(server, tmp_path):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    missing = tmp_path / "store" / "missing.gguf"
    with serving(BASE_CONFIG, smollm2_loader(missing), ready="failed") as base:
        res = httpx.get(f"{base}/health")
        assert res.status_code == 503 and res.json() == {"status": "failed"}
        chat = post_chat(base, CHAT)
        assert chat.status_code == 503 and str(tmp_path) not in chat.text
        assert chat.json()["error"]["code"] == "model_load_failed"


# -- half-sent requests ----------------------------------------------------------------------------

def _read_until_closed(sock: socket.socket, guard_s: float = 60.0) -> bytes:
    """Everything the server sends until it closes the connection (a hang guard, not a timing)."""
    sock.settimeout(guard_s)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_half_sent_request_heads_are_disconnected(server):
    before = metric(server, "edgert_header_timeouts_total")
    socks = [socket.create_connection((LOOPBACK, int(server.rsplit(":", 1)[1]))) for _ in range(50)]
    try:
        for sock in socks:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x")
        for sock in socks:
            assert _read_until_closed(sock) == b""
    finally:
        for sock in socks:
            sock.close()
    assert metric(server, "edgert_header_timeouts_total") >= before + 50


def test_a_keep_alive_connection_stalling_in_its_next_head_is_disconnected(server):
    with socket.create_connection((LOOPBACK, int(server.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.settimeout(60)
        first = b""
        while b'{"status":"ok"}' not in first:
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        sock.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert _read_until_closed(sock) == b""


def test_a_body_that_stops_coming_gets_408_and_the_connection_closes(server):
    with socket.create_connection((LOOPBACK, int(server.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"messages\":")
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer


def test_a_stream_read_slowly_outlives_the_head_deadline(server):
    body = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 48, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=120) as res:
        lines = res.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        time.sleep(2 * BASE_CONFIG.header_timeout_s)  # a slow reader while tokens keep coming
        rest = [line for line in lines if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
