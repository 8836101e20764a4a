"""The newest openai release, the one apps ship, against the real server: chat, stream, parse, tools.

The test venv pins openai 1.x (its typing-extensions pin), so the newest release gets a venv of
its own under the pytest cache, made once and reused; the test skips only where PyPI cannot be
reached. The client runs as a script in that venv, against the server on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from test_server_safety import serving, smollm2_loader

from edge_runtime.server.state import ServerConfig

CLIENT_SCRIPT = r'''
import json, sys
from typing import Literal

import openai
import pydantic


class Capital(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    city: str = pydantic.Field(max_length=24)
    certain: bool


class Clock(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    timezone: Literal["UTC", "Europe/Paris", "Asia/Tokyo"]


client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0, timeout=600)
hi = [{"role": "user", "content": "Say hello."}]
out = {"version": openai.__version__}
reply = client.chat.completions.create(model="default", messages=hi, temperature=0, max_tokens=8)
out["chat"] = reply.choices[0].message.content
stream = client.chat.completions.create(model="default", messages=hi, temperature=0, max_tokens=8, stream=True,
                                        stream_options={"include_usage": True})
out["stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
ask = [{"role": "user", "content": 'The capital of France, in JSON with "city" and "certain" (true or false).'}]
parsed = client.chat.completions.parse(model="default", messages=ask, response_format=Capital, temperature=0,
                                       max_tokens=60)
out["parsed"] = parsed.choices[0].message.parsed.model_dump()
tools = [openai.pydantic_function_tool(Clock, name="get_time", description="The time in a timezone")]
with client.chat.completions.stream(model="default", messages=[{"role": "user", "content": "Time in Tokyo?"}],
                                    tools=tools, tool_choice="required", temperature=0, max_tokens=60) as events:
    final = events.get_final_completion().choices[0]
call = final.message.tool_calls[0]
out["tool"] = [final.finish_reason, call.function.name, call.function.parsed_arguments.model_dump()]
print(json.dumps(out))
'''


def _pypi_reachable(package: str) -> bool:
    try:
        return httpx.get(f"https://pypi.org/simple/{package}/", timeout=15).status_code == 200
    except httpx.HTTPError:
        return False


def latest_release_python(request: pytest.FixtureRequest, package: str) -> Path:
    """A venv holding the newest release of ``package`` (made once; skipped only if PyPI is out of reach)."""
    folder = Path(request.config.cache.mkdir(f"{package}-latest-venv"))
    python = folder / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True, capture_output=True, timeout=300)
    installed = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--upgrade", package],
                               capture_output=True, text=True, timeout=600)
    if installed.returncode != 0:
        if not _pypi_reachable(package):
            pytest.skip(f"PyPI cannot be reached, so the newest {package} cannot be installed")
        raise AssertionError(f"pip could not install {package}:\n{installed.stderr[-2000:]}")
    return python


@pytest.fixture(scope="session")
def latest_openai_python(request: pytest.FixtureRequest) -> Path:
    """A venv holding the newest openai release."""
    return latest_release_python(request, "openai")


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(model_id="smollm2", parallel=1, queue_size=4)
    with serving(config, smollm2_loader(smollm2_path, n_ctx=1024, n_parallel=1)) as base:
        yield base


def test_the_newest_openai_client_chats_streams_parses_and_calls_tools(latest_openai_python, server):
    run = subprocess.run([str(latest_openai_python), "-c", CLIENT_SCRIPT, server], capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert int(out["version"].split(".")[0]) >= 2, out["version"]
    assert out["chat"] and out["stream"] == out["chat"]
    assert out["parsed"]["city"] and isinstance(out["parsed"]["certain"], bool)
    finish, name, arguments = out["tool"]
    assert (finish, name) == ("tool_calls", "get_time")
    assert arguments["timezone"] in ("UTC", "Europe/Paris", "Asia/Tokyo")
