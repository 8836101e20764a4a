"""A model split across llama.cpp RPC workers: real `edgert worker` processes on 127.0.0.1, the real
RPC library (scripts/enable_rpc.sh builds it), real greedy tokens, and a real server whose worker
is killed in the middle of an answer.

Without the library these tests skip here, and fail in CI (``CI`` set), which must run them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from edge_runtime.backends.base import Availability, CancelToken, SamplingParams, Settings
from edge_runtime.backends.llamacpp import rpc
from edge_runtime.backends.llamacpp.rpc import WorkerDevice
from edge_runtime.device.info import CpuInfo, DeviceInfo, MemoryInfo
from edge_runtime.errors import BackendUnavailableError, GenerationError, InvalidConfigError, WorkerUnavailableError
from edge_runtime.local_server import LOOPBACK, free_port, running_server
from edge_runtime.planning.split import layer_counts

REPO = Path(__file__).resolve().parent.parent
GIB = 1 << 30
GREEDY = SamplingParams(max_tokens=40, temperature=0.0)
PROMPTS = ("The three primary colors are", "def fibonacci(n):")


def need_rpc() -> None:
    """Skip without the RPC library, except in CI, where its absence is a failure."""
    status = rpc.library_status()
    if status.available:
        return
    why = f"llama.cpp's RPC backend is not available ({status.reason}): run scripts/enable_rpc.sh"
    if os.environ.get("CI"):
        pytest.fail(f"{why}; CI runs the RPC tests for real", pytrace=False)
    pytest.skip(why)


@contextlib.contextmanager
def worker(edgert_cmd: list[str], port: int, *extra: str) -> Iterator[subprocess.Popen]:
    """A real `edgert worker` on 127.0.0.1:port, answering TCP; killed afterwards."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen([*edgert_cmd, "worker", "--port", str(port), "--threads", "1", *extra],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    rpc.check_reachable(f"{LOOPBACK}:{port}", timeout=1)
                    break
                except WorkerUnavailableError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise AssertionError(f"the worker did not start: {log.read().decode()}") from None
                    time.sleep(0.2)
            yield process
        finally:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def workers(edgert_cmd) -> Iterator[tuple[str, str]]:
    need_rpc()
    ports = free_port(), free_port()
    with worker(edgert_cmd, ports[0]), worker(edgert_cmd, ports[1]):
        yield f"{LOOPBACK}:{ports[0]}", f"{LOOPBACK}:{ports[1]}"


def greedy_tokens(model, prompt: str) -> list[int]:
    tokens = model.tokenize(prompt, add_bos=model.info.add_bos)
    return [e.token for e in model.generate(tokens, GREEDY) if e.token is not None]


# -- on any machine: the pieces that need no worker ------------------------------------------

def test_worker_addresses_are_checked():
    assert rpc.parse_workers("10.0.0.2:50052, pi5.local:50053") == ("10.0.0.2:50052", "pi5.local:50053")
    for bad in ("pi5.local", "10.0.0.2:0", "10.0.0.2:70000", "[::1]:50052", "a b:1"):
        with pytest.raises(InvalidConfigError, match="not a worker address"):
            rpc.parse_workers(bad)
    with pytest.raises(InvalidConfigError, match="named twice"):
        rpc.parse_workers("h:1,h:1")


def test_bad_worker_addresses_are_usage_errors(edgert_cmd):
    res = subprocess.run([*edgert_cmd, "plan", "--workers", "pi5.local"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "not a worker address" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize(("gpu_layers", "split", "expected"), [
    (31, [1, 1], (0, [16, 15])), (31, [1, 3], (0, [8, 23])), (31, [2, 1], (0, [21, 10])),
    (10, [1, 1], (21, [5, 5])), (31, [0, 1], (0, [0, 31])),
])
def test_layers_go_where_llama_cpp_puts_them(gpu_layers, split, expected):
    # What llama.cpp's load log said for SmolLM2 (30 blocks + output) split over two workers.
    assert layer_counts(30, gpu_layers, split) == expected


def test_the_plan_fills_the_workers_memory_and_splits_by_it(smollm2_path):
    from edge_runtime.models.artifact import artifact_from_gguf
    from edge_runtime.planning.planner import PlanRequest, choose_plan
    from edge_runtime.planning.profiles import get_profile

    artifact = artifact_from_gguf(smollm2_path)
    pi = DeviceInfo(cpu=CpuInfo(arch="aarch64", physical_cores=4, performance_cores=4),
                    memory=MemoryInfo(total_bytes=4 * GIB, available_bytes=3 * GIB),
                    backends=(Availability(name="llama.cpp", available=True, version="0.3.36", devices=("CPU",)),))

    def plan_with(*memory: int):
        workers = tuple(WorkerDevice(f"10.0.0.{i + 2}:50052", f"RPC{i}", m, m) for i, m in enumerate(memory))
        return choose_plan([artifact], pi, get_profile("generic"), PlanRequest(ctx=1024, workers=workers))

    plan = plan_with(8 * GIB, 4 * GIB)  # CPU workers report all RAM free: the plan uses three quarters
    assert plan.settings.n_gpu_layers == 31 and plan.settings.rpc_servers == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert plan.settings.tensor_split == (6.0, 3.0) and [w.layers for w in plan.workers] == [21, 10]
    assert [w.usable_bytes for w in plan.workers] == [6 * GIB, 3 * GIB]
    assert plan.to_dict()["workers"][0]["layers"] == 21
    partial = plan_with(60 << 20, 60 << 20)  # room for part of the model only: the rest stays here
    layers = [w.layers for w in partial.workers]
    assert 0 < partial.settings.n_gpu_layers < 31 and sum(layers) == partial.settings.n_gpu_layers and all(layers)
    assert partial.memory.vram_bytes <= 2 * int(0.75 * (60 << 20))
    nothing = plan_with(1 << 20)
    assert nothing.settings.rpc_servers == () and nothing.settings.n_gpu_layers == 0 and not nothing.workers
    assert any("not one layer fits" in r for r in nothing.reasons)


def test_a_stale_or_missing_library_is_said_so(tmp_path, monkeypatch):
    monkeypatch.setenv(rpc.LIBRARY_ENV, str(tmp_path / "libggml-rpc.so"))
    status = rpc.library_status()
    if status.state in ("built-in", "unsupported"):
        pytest.skip(f"the RPC library is {status.state} here")
    assert status.state == "missing" and not status.available
    (tmp_path / "libggml-rpc.so").write_bytes(b"\x7fELF")
    (tmp_path / "libggml-rpc.json").write_text(json.dumps({"llama_cpp_python": "0.0.1",
                                                           "libggml_base_sha256": status.base_sha256}))
    stale = rpc.library_status()
    assert stale.state == "stale" and "0.0.1" in stale.reason
    with pytest.raises(BackendUnavailableError) as refused:
        rpc.require_library()
    assert "scripts/enable_rpc.sh" in refused.value.hint
    (tmp_path / "libggml-rpc.json").write_text(json.dumps({"llama_cpp_python": status.llama_cpp_version,
                                                           "libggml_base_sha256": status.base_sha256}))
    assert rpc.library_status().state == "installed"


def test_a_worker_that_is_not_there_is_one_clear_line(edgert_cmd):
    need_rpc()
    res = subprocess.run([*edgert_cmd, "run", "Hi", "--workers", f"{LOOPBACK}:{free_port()}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert res.stderr.startswith("error: the worker") and "does not answer" in res.stderr
    assert "Traceback" not in res.stderr


# -- real workers ------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_split_model_gives_the_local_greedy_tokens(workers, smollm2, smollm2_path):
    import edge_runtime
    from edge_runtime.backends.llamacpp import LlamaCppBackend
    from edge_runtime.backends.llamacpp.remote import RemoteModel
    from edge_runtime.device import detect

    here = detect(probe_backends=False)  # llama.cpp is probed by the planner itself
    plan = edge_runtime.plan(str(smollm2_path), workers=workers, ctx=512, threads=1, device=here)
    assert plan.settings.rpc_servers == workers and plan.settings.n_gpu_layers == 31
    assert [w.endpoint for w in plan.workers] == list(workers)
    assert all(w.layers > 0 for w in plan.workers) and sum(w.layers for w in plan.workers) == 31
    with LlamaCppBackend.load(str(smollm2_path), plan.settings) as split:
        assert isinstance(split, RemoteModel)
        # llama.cpp put weights on both workers, not only on this machine
        on_workers = {name: mib for name, mib in split.placement.items() if "[" in name}
        assert all(any(w in name and mib > 0 for name, mib in on_workers.items()) for w in workers), split.placement
        for prompt in PROMPTS:
            assert greedy_tokens(split, prompt) == greedy_tokens(smollm2, prompt), prompt
    import llama_cpp

    assert not llama_cpp.llama_supports_rpc()  # this process never loaded the RPC library


@pytest.mark.slow
def test_a_split_model_keeps_the_model_protocol(workers, smollm2_path):
    from edge_runtime.backends.llamacpp import LlamaCppBackend

    settings = Settings(n_ctx=512, n_threads=1, n_gpu_layers=99, n_parallel=2, rpc_servers=workers)
    model = LlamaCppBackend.load(str(smollm2_path), settings)
    try:
        tokens = model.tokenize(PROMPTS[0], add_bos=model.info.add_bos)
        first = list(model.generate(tokens, GREEDY))
        again = list(model.generate(tokens + [e.token for e in first if e.token is not None], GREEDY))
        assert again[-1].stats.cached_tokens > len(tokens)  # the child's cache kept the first turn
        model.reset()
        fresh = list(model.generate(tokens, GREEDY))
        assert fresh[-1].stats.cached_tokens == 0 and [e.token for e in fresh] == [e.token for e in first]
        cancel = CancelToken()
        seen = []
        for event in model.generate(tokens, SamplingParams(max_tokens=200, temperature=0.0), cancel=cancel):
            seen.append(event)
            if len(seen) == 3:
                cancel.cancel()
        assert seen[-1].finish_reason == "cancelled" and len(seen) < 200
        results: dict[int, list[int]] = {}

        def answer(i: int) -> None:
            with model.acquire_slot(tokens, timeout=60) as slot:
                results[i] = [e.token for e in slot.generate(tokens, GREEDY) if e.token is not None]

        threads = [threading.Thread(target=answer, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results[0] == results[1] == [e.token for e in first if e.token is not None]
        with pytest.raises(GenerationError, match="split across workers"):
            next(iter(model.logit_rows(tokens, 1)))
    finally:
        model.close()
    with pytest.raises(GenerationError, match="closed"):
        model.generate(tokens, GREEDY)


@pytest.mark.slow
def test_the_rpc_hop_in_the_time_to_first_token(workers, smollm2_path):
    from edge_runtime.backends.llamacpp.rpc_ttft import rpc_ttft_ms

    settings = Settings(n_ctx=512, n_threads=1, n_gpu_layers=99, rpc_servers=workers, tensor_split=(1.0, 1.0))
    tokens = list(range(100, 164))
    hop = rpc_ttft_ms(str(smollm2_path), settings, tokens, reps=1)
    assert isinstance(hop, float) and hop == hop  # a figure, not NaN (its size is the bench's to report)
    with pytest.raises(InvalidConfigError, match="name workers"):
        rpc_ttft_ms(str(smollm2_path), Settings(n_ctx=512), tokens)


def test_plan_shows_where_the_layers_go(workers, edgert_cmd):
    res = subprocess.run([*edgert_cmd, "plan", "--workers", ",".join(workers), "--json"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [w["endpoint"] for w in doc["workers"]] == list(workers)
    for w in doc["workers"]:
        assert 0 < w["usable_bytes"] <= w["free_bytes"] <= w["total_bytes"] and w["layers"] > 0
    assert len(doc["settings"]["tensor_split"]) == 2 and "rpc_servers" not in doc["settings"]
    text = subprocess.run([*edgert_cmd, "plan", "--workers", ",".join(workers)], capture_output=True, text=True,
                          timeout=120).stdout
    assert f"workers   {workers[0]}" in text and "layers" in text


def test_the_worker_refuses_a_taken_port_and_warns_off_loopback(workers, edgert_cmd):
    taken = workers[0].rpartition(":")[2]
    res = subprocess.run([*edgert_cmd, "worker", "--port", taken], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "cannot listen" in res.stderr and "Traceback" not in res.stderr
    port = free_port()
    process = subprocess.Popen([*edgert_cmd, "worker", "--host", "0.0.0.0", "--port", str(port)],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        first = process.stderr.readline()
    finally:
        process.kill()
        process.wait()
    assert first.startswith("warning: serving on 0.0.0.0") and "no authentication" in first


def test_enable_rpc_is_a_no_op_when_the_library_is_current(workers):
    if rpc.library_status().state != "installed":
        pytest.skip("the library is not the one enable_rpc.sh installs")
    res = subprocess.run([str(REPO / "scripts" / "enable_rpc.sh"), sys.executable], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "up to date" in res.stderr, res.stderr


@pytest.mark.slow
def test_a_worker_killed_mid_answer_fails_that_request_and_the_server_serves_on(edgert_cmd):
    need_rpc()
    ports = free_port(), free_port()
    endpoints = ",".join(f"{LOOPBACK}:{p}" for p in ports)
    server_port = free_port()
    base = f"http://{LOOPBACK}:{server_port}"
    body = {"model": "default", "prompt": "The history of the bicycle", "max_tokens": 300, "temperature": 0}
    with worker(edgert_cmd, ports[0]), contextlib.ExitStack() as stack:
        second = stack.enter_context(worker(edgert_cmd, ports[1]))
        stack.enter_context(running_server([*edgert_cmd, "serve", "--port", str(server_port), "--parallel", "1",
                                            "--ctx", "512", "--threads", "1", "--workers", endpoints],
                                           f"{base}/health", timeout=240))
        short = {**body, "max_tokens": 8}
        before = httpx.post(f"{base}/v1/completions", json=short, timeout=120)
        assert before.status_code == 200, before.text
        with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as res:
            lines = res.iter_lines()
            chunks = [next(lines) for _ in range(6)]  # the answer is under way ...
            second.send_signal(signal.SIGKILL)  # ... when a worker dies
            rest = list(lines)
        assert any('"text"' in c for c in chunks)
        errors = [json.loads(line[6:])["error"] for line in rest if line.startswith("data: {") and '"error"' in line]
        assert errors and errors[0]["code"] == "worker_unavailable", rest[-3:]
        assert "went away" in errors[0]["message"] or "stopped" in errors[0]["message"]
        down = httpx.post(f"{base}/v1/completions", json=short, timeout=120)
        assert down.status_code == 503 and down.json()["error"]["code"] == "worker_unavailable"
        assert str(ports[1]) in down.json()["error"]["message"]
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200  # the server lives on
        with worker(edgert_cmd, ports[1]):  # the worker is back: the model starts again on the next request
            after = httpx.post(f"{base}/v1/completions", json=short, timeout=240)
            assert after.status_code == 200, after.text
            assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
