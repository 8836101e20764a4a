"""Smoke tests of what users run: a chat session answers, the local server answers."""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.request
from typing import Any

import pytest

SERVER_START_TIMEOUT_S = 180


def test_chat_session_answers(model: Any) -> None:
    """A chat session answers."""
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.session import Session

    session = Session(model, params=SamplingParams(max_tokens=24, temperature=0))
    events = list(session.send("Name one colour."))
    text = "".join(e.text for e in events)
    assert text.strip(), "the chat answered with nothing"
    assert events[-1].finish_reason in ("stop", "length")


def _chat(base: str, text: str) -> dict[str, Any]:
    """One greedy chat completion from the server at ``base``."""
    body = json.dumps({"model": "default", "max_tokens": 16, "temperature": 0,
                       "messages": [{"role": "user", "content": text}]}).encode()
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_server_answers(plan: Any) -> None:
    """`edgert serve` starts and answers a chat completion."""
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip('the server stack is not installed (pip install "edge-runtime[server]")')
    from edge_runtime.local_server import LOOPBACK, ServerNotReady, free_port, running_server

    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", plan.artifact.path, "--port", str(port)]
    try:
        with running_server(argv, f"{base}/health", timeout=SERVER_START_TIMEOUT_S):
            answer = _chat(base, "Name one colour.")
    except ServerNotReady as exc:
        pytest.fail(f"edgert serve did not start: {exc}")
    assert answer["choices"][0]["message"]["content"].strip()
    assert answer["usage"]["completion_tokens"] >= 1
