"""What a client sends can earn it a 4xx, never a 5xx: numbers, nesting, metrics, memory, --force.

The real app under uvicorn on 127.0.0.1 (``test_server_safety.serving``), and a real ``edgert
serve`` for the command's own options.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest
from test_server_safety import BASE_CONFIG, CHAT, metric, post_chat, requests_counted, serving, smollm2_loader

from edge_runtime.files import json_depth
from edge_runtime.local_server import LOOPBACK, free_port, running_server
from edge_runtime.server.wire import MAX_JSON_DEPTH

MIB = 1 << 20


@pytest.fixture(scope="module")
def server(smollm2_path):
    with serving(BASE_CONFIG, smollm2_loader(smollm2_path)) as base:
        yield base


def _chat_with(raw_field: str) -> bytes:
    """A chat body with one more field, written as raw JSON text (NaN is no Python-json output)."""
    return b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, ' + raw_field.encode() + b"}"


# -- numbers ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repeat_penalty"])
def test_non_finite_numbers_are_refused_by_name(server, field, value):
    res = post_chat(server, _chat_with(f'"{field}": {value}'))
    assert res.status_code == 400, res.text
    error = res.json()["error"]
    assert error["param"] == field and "finite" in error["message"]


@pytest.mark.parametrize("seed", [-1, 2**32 - 1, 2**32, 2**70])
def test_seeds_outside_uint32_less_the_random_marker_are_refused(server, seed):
    res = post_chat(server, {**CHAT, "seed": seed})
    assert res.status_code == 400
    assert res.json()["error"]["param"] == "seed" and "between 0 and 4294967294" in res.json()["error"]["message"]


@pytest.mark.parametrize("seed", [0, 2**32 - 2])
def test_seeds_at_the_bounds_are_taken(server, seed):
    assert post_chat(server, {**CHAT, "seed": seed, "temperature": 1.0}).status_code == 200


@pytest.mark.parametrize("field,value,bounds", [
    ("repeat_penalty", 0, "between 0.01 and 10"), ("repeat_penalty", 1e30, "between 0.01 and 10"),
    ("max_tokens", 0, "between 1 and 2147483647"), ("top_k", -1, "between 0 and 2147483647"),
    ("top_k", 2**40, "between 0 and 2147483647"), ("temperature", 2.5, "between 0 and 2"),
    ("n", 0, "at least 1"),
])
def test_range_errors_name_both_bounds(server, field, value, bounds):
    res = post_chat(server, {**CHAT, field: value})
    assert res.status_code == 400
    message = res.json()["error"]["message"]
    assert bounds in message and "None" not in message and res.json()["error"]["param"] == field


# -- bodies that used to end in a 500 ------------------------------------------------------------

@pytest.mark.parametrize("name,body,code", [
    ("100,000 nested arrays", b"[" * 100_000 + b"]" * 100_000, "body_too_deep"),
    ("100,000 nested objects, unclosed", b'{"a":' * 100_000, "body_too_deep"),
    ("nesting inside the messages", _chat_with('"x": ' + "[" * 65 + "]" * 65), "body_too_deep"),
    ("a 5,000-digit integer", _chat_with('"max_tokens": ' + "9" * 5000), None),
    ("a lone surrogate in the content", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("a lone surrogate in the model", b'{"model": "\\udfff", "messages": [{"role": "user", "content": "hi"}]}', None),
])
def test_hostile_bodies_get_400_and_are_counted(server, name, body, code):
    before = requests_counted(server, "chat", 400)
    res = post_chat(server, body)
    assert res.status_code == 400, f"{name}: {res.status_code} {res.text[:200]}"
    if code:
        assert res.json()["error"]["code"] == code
    assert requests_counted(server, "chat", 400) == before + 1


def test_brackets_inside_strings_do_not_count_as_nesting(server):
    content = '[{"quoted \\" bracket [[[' + "[" * 100 + "\\\\"
    assert json_depth(json.dumps({"a": [content]}).encode()) == 2
    assert json_depth(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1)) == MAX_JSON_DEPTH + 1
    res = post_chat(server, {"messages": [{"role": "user", "content": content}], "max_tokens": 1})
    assert res.status_code == 200, res.text


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chat_template_refusing_the_conversation_is_a_400(smollm2_path, tmp_path):
    strict = tmp_path / "smollm2-strict.gguf"  # SmolLM2 with a template that raises, as Gemma's does
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(smollm2_path), str(strict),
                    "--chat-template", STRICT_TEMPLATE, "--force"], check=True, capture_output=True, timeout=300)
    with serving(BASE_CONFIG, smollm2_loader(strict, n_parallel=1)) as base:
        assert post_chat(base, CHAT).status_code == 200
        twice = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}
        res = post_chat(base, twice)
        assert res.status_code == 400 and "roles must alternate" in res.json()["error"]["message"]


def test_every_request_is_counted_by_endpoint_and_status(server):
    checks = [(lambda: httpx.get(f"{server}/v1/nothing"), "other", 404),
              (lambda: httpx.get(f"{server}/v1/chat/completions"), "chat", 405),
              (lambda: post_chat(server, CHAT, {"Host": "evil.example"}), "chat", 403),
              (lambda: post_chat(server, b"{not json"), "chat", 400),
              (lambda: httpx.get(f"{server}/v1/models"), "models", 200)]
    for send, endpoint, status in checks:
        before = requests_counted(server, endpoint, status)
        assert send().status_code == status
        assert requests_counted(server, endpoint, status) == before + 1, (endpoint, status)


# -- memory admission ----------------------------------------------------------------------------

def test_a_request_past_the_memory_limit_gets_503_with_the_figures(smollm2_path):
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.server.admission import request_bytes

    model = smollm2_loader(smollm2_path, n_parallel=1)()
    for _ in model.generate(model.tokenize("Hello"), SamplingParams(max_tokens=2)):
        pass  # the slot's first use touches its buffers
    rss = psutil.Process().memory_info().rss  # this process serves: the server runs in a thread
    with serving(replace(BASE_CONFIG, memory_limit_bytes=rss + 24 * MIB), lambda: model) as base:
        assert post_chat(base, CHAT).status_code == 200
        big = json.dumps({"messages": [{"role": "user", "content": "word " * (900_000 // 5)}]}).encode()
        assert request_bytes(len(big), 1024) > 24 * MIB  # more than the room the limit leaves
        before = requests_counted(base, "chat", 503)
        res = post_chat(base, big)
        assert res.status_code == 503 and res.headers["retry-after"].isdigit()
        error = res.json()["error"]
        assert error["code"] == "memory_exhausted" and "MiB" in error["message"]
        assert requests_counted(base, "chat", 503) == before + 1


def test_with_no_room_left_every_completion_gets_503(smollm2_path):
    with serving(replace(BASE_CONFIG, memory_limit_bytes=MIB), smollm2_loader(smollm2_path, n_parallel=1)) as base:
        res = post_chat(base, CHAT)
        assert res.status_code == 503 and res.headers["retry-after"].isdigit()
        assert "the plan allows 1 MiB" in res.json()["error"]["message"]
        assert httpx.get(f"{base}/v1/models").status_code == 200  # nothing else is refused


# -- edgert serve's own options ---------------------------------------------------------------------

@pytest.fixture
def small_budget_home(tmp_path, monkeypatch):
    """A model home whose one extra profile matches any device and leaves a ~256 MiB budget."""
    generic = (Path(__file__).resolve().parent.parent / "profiles" / "generic.toml").read_text()
    headroom = psutil.virtual_memory().available // MIB - 256
    profile = generic
    for pattern, value in ((r'^id = ".*"$', 'id = "test-small-budget"'), (r"^priority = \d+$", "priority = 9999"),
                           (r"^headroom_mib = \d+$", f"headroom_mib = {headroom}")):
        profile, n = re.subn(pattern, value, profile, count=1, flags=re.MULTILINE)
        assert n == 1, f"generic.toml has no line matching {pattern}"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "test-small-budget.toml").write_text(profile)
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path))
    return tmp_path


def test_forced_settings_beyond_the_budget_are_refused_before_loading_unless_force(edgert_cmd, small_budget_home):
    # 4 slots of 8192 need ~900 MiB: far past a 256 MiB budget, whatever else the machine runs.
    args = ["serve", "--ctx", "8192", "--parallel", "4", "--threads", "2"]
    refused = subprocess.run([*edgert_cmd, *args, "--port", str(free_port())], capture_output=True, text=True,
                             timeout=120)
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.startswith("error: nothing fits") and "needs" in refused.stderr
    assert "--force" in refused.stderr and "plan:" not in refused.stderr
    port = free_port()
    with running_server([*edgert_cmd, *args, "--port", str(port), "--force"], f"http://{LOOPBACK}:{port}/health"):
        assert httpx.get(f"http://{LOOPBACK}:{port}/health").json() == {"status": "ok"}


def test_edgert_serve_answers_only_its_hosts_and_origins(edgert_cmd):
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    argv = [*edgert_cmd, "serve", "--port", str(port), "--ctx", "512", "--parallel", "1", "--threads", "2",
            "--allow-host", "edge.internal", "--allow-origin", "https://app.example"]
    with running_server(argv, f"{base}/health"):
        assert post_chat(base, CHAT, {"Host": "evil.example.com", "Content-Type": "text/plain"}).status_code == 403
        assert post_chat(base, CHAT, {"Origin": "https://evil.example"}).status_code == 403
        assert httpx.get(f"{base}/v1/models", headers={"Host": "edge.internal:8080"}).status_code == 200
        assert post_chat(base, CHAT, {"Origin": "https://app.example"}).status_code == 200
        assert metric(base, 'edgert_requests_total{endpoint="chat",status="403"}') == 2
