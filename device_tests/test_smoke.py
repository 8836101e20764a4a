"""Smoke tests of what users run: a chat session answers, the local server answers."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

SERVER_START_TIMEOUT_S = 180


def test_chat_session_answers(model: Any) -> None:
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.session import Session

    session = Session(model, params=SamplingParams(max_tokens=24, temperature=0))
    events = list(session.send("Name one colour."))
    text = "".join(e.text for e in events)
    assert text.strip(), "the chat answered with nothing"
    assert events[-1].finish_reason in ("stop", "length")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_server_answers(plan: Any) -> None:
    if importlib.util.find_spec("edge_runtime.server.app") is None:
        pytest.skip("edge_runtime.server.app is not part of this edgert yet")
    if importlib.util.find_spec("uvicorn") is None:
        pytest.skip('the server stack is not installed (pip install "edge-runtime[server]")')
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "edge_runtime.cli", "serve", "--model", plan.artifact.path,
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"edgert serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if _get(f"{base}/health") == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"edgert serve was not ready within {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.5)
        body = json.dumps({"model": "default", "max_tokens": 16, "temperature": 0,
                           "messages": [{"role": "user", "content": "Name one colour."}]}).encode()
        request = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        assert answer["choices"][0]["message"]["content"].strip()
        assert answer["usage"]["completion_tokens"] >= 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
