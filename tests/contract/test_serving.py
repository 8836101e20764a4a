"""A slot under the real server: the Starlette app under uvicorn on 127.0.0.1, driven by the openai
client, answers what the model itself answers, on every backend."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from edge_runtime.backends.base import SamplingParams

from .streams import run

openai = pytest.importorskip("openai", reason='needs the dev extra: pip install -e ".[dev]"')
pytest.importorskip("uvicorn", reason='needs the server extra: pip install "edge-runtime[server]"')

MESSAGES = [{"role": "user", "content": "Where does the river go after the mill?"}]


@contextmanager
def serving(converted) -> Iterator[str]:
    """The app on a free loopback port, in a thread, with its own model on ``converted``; its base URL.

    The app loads the model itself and closes it at shutdown, so it gets one of its own.
    """
    import uvicorn

    from edge_runtime.local_server import LOOPBACK, free_port, wait_until_serving
    from edge_runtime.server.app import ServerConfig, create_app

    port = free_port()
    app = create_app(ServerConfig(model_id="tiny", parallel=1, queue_size=4), load_model=converted.load)
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="contract-server", daemon=True)
    thread.start()
    base = f"http://{LOOPBACK}:{port}"
    try:
        wait_until_serving(f"{base}/health", timeout=120)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not stop"


def test_the_server_answers_what_the_model_answers(converted, model):
    from test_server import _metric

    from edge_runtime.session import ChatFormatter

    prompt = ChatFormatter(model).tokens(MESSAGES)
    model.reset()
    expected = run(model, prompt, SamplingParams(max_tokens=8, temperature=0.0))
    assert expected.tokens, "the model says nothing to this prompt: pick another"
    with serving(converted) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8)
        choice = reply.choices[0]
        assert choice.message.content == expected.text and choice.finish_reason == expected.finish_reason
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected.tokens))
        assert _metric(base, "edgert_cached_prompt_tokens_total") == 0
        # Streamed, a second time: the server's one slot already holds the prompt.
        chunks = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0, max_tokens=8,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
        assert _metric(base, "edgert_cached_prompt_tokens_total") == len(prompt) - 1
