"""The latency anatomy of one reply (``edgert bench --anatomy``): where its time goes, term by term.

Run in the bench's child process (``bench.worker``, a job with ``"anatomy": true``), per artifact:

- storage: the load with the file's pages dropped from the page cache (``posix_fadvise(...,
  POSIX_FADV_DONTNEED)``, no root needed; pages another process maps stay) against a warm load,
  and the page-in the first prefill pays after a cold mmap load (cold first prefill minus warm
  first prefill, at least 0); each with mmap (the plan's default) and without (``_no_mmap_s``);
- compute: prefill and decode speed at 1..N threads (N: the job's threads), the scaling curve,
  and the roofline's decode ceiling where the parent knows it;
- transfer: TTFT of one prompt in this process, and through ``edgert serve`` over loopback HTTP,
  streamed (a server process of its own, after a warm-up request with another prompt); over RPC
  when the job names workers, else null;
- cache: TTFT of the last turn of a long chat with an empty KV cache (cold), with the earlier
  turns' KV state restored from the disk prompt cache (``models.prompt_cache``, a private store),
  and with everything before that turn already evaluated in memory (hot); restored is null, with
  ``restored_note`` saying why, on a backend that cannot save its state.

Every figure is one measurement after a warm-up, not a mean: the anatomy shows proportions, the
bench's own reps give the spread.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge_runtime.backends.base import Model, Settings, first_token_s, greedy_stats
from edge_runtime.errors import GenerationError

CHAT_TURNS = 4


def drop_from_page_cache(path: str | Path) -> bool:
    """Ask the kernel to forget the cached pages of a file, or of every file in a folder; False
    where the system has no ``posix_fadvise`` (macOS, Windows): the "cold" load is then warm."""
    if not hasattr(os, "posix_fadvise"):
        return False
    target = Path(path)
    files = [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else [target]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # the kernel keeps dirty pages (a file just written): write them out first
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _speeds(model: Model, prompt: list[int], decode_prompt: list[int], gen_tokens: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) from one run each, from an empty cache."""
    return greedy_stats(model, prompt).prefill_tok_s, greedy_stats(model, decode_prompt, gen_tokens).decode_tok_s


def _storage(backend: Any, path: str, settings: Settings, tokens: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for use_mmap, suffix in ((True, "_s"), (False, "_no_mmap_s")):
        chosen = replace(settings, use_mmap=use_mmap, n_parallel=1)
        firsts = []
        for cold in (True, False):
            if cold and not drop_from_page_cache(path):
                out["note"] = "this system cannot drop a file's pages (no posix_fadvise): cold loads are warm"
            started = time.perf_counter()
            model = backend.load(path, chosen)
            load_s = time.perf_counter() - started
            try:
                firsts.append(first_token_s(model, tokens))
            finally:
                model.close()
            out[("cold_load" if cold else "warm_load") + suffix] = load_s
        out["first_prefill_pagein" + suffix] = max(0.0, firsts[0] - firsts[1])
    return out


def _compute(backend: Any, path: str, settings: Settings, prompt: list[int], decode_prompt: list[int],
             gen_tokens: int, max_threads: int) -> dict[str, Any]:
    prefill, decode = {}, {}
    for n in range(1, max_threads + 1):
        with backend.load(path, replace(settings, n_threads=n, n_threads_batch=n, n_parallel=1)) as model:
            _speeds(model, prompt[:8], decode_prompt, 2)  # warm-up: first-touch costs
            prefill[str(n)], decode[str(n)] = _speeds(model, prompt, decode_prompt, gen_tokens)
    return {"prefill_tok_s": prefill, "decode_tok_s": decode}


def _chat_turns(model: Model, text: str, words_per_turn: int) -> tuple[list[int], list[int]]:
    """(the tokens the whole chat shares with it before its last user turn, the whole chat's tokens)
    of a chat of ``CHAT_TURNS`` turns, each user message ``words_per_turn`` words of ``text`` and each
    answer half as many; halved until the chat fits the context."""
    from edge_runtime.session import ChatFormatter

    words, n = text.split(), words_per_turn
    messages: list[dict[str, str]] = []
    for turn in range(CHAT_TURNS):
        messages.append({"role": "user", "content": " ".join(words[turn * n:(turn + 1) * n]) or "Go on."})
        if turn < CHAT_TURNS - 1:
            answer = words[(CHAT_TURNS + turn) * n:(CHAT_TURNS + turn) * n + n // 2]
            messages.append({"role": "assistant", "content": " ".join(answer) or "Yes."})
    formatter = ChatFormatter(model)
    earlier, whole = formatter.tokens(messages[:-1]), formatter.tokens(messages)
    if len(whole) >= model.info.n_ctx - 1 and words_per_turn > 4:
        return _chat_turns(model, text, words_per_turn // 2)
    # `earlier` ends with the assistant's header, which the next user turn replaces: what a chat
    # holds in its cache when the last turn comes is the part both share
    shared = next((i for i, (a, b) in enumerate(zip(earlier, whole, strict=False)) if a != b),
                  min(len(earlier), len(whole)))
    return whole[:shared], whole


def _cache(model: Model, text: str, words_per_turn: int) -> dict[str, Any]:
    before, whole = _chat_turns(model, text, words_per_turn)
    first_token_s(model, whole)  # warm-up
    cold = first_token_s(model, whole)
    first_token_s(model, before)  # the earlier turns evaluated: what a chat holds when the next one comes
    hot = first_token_s(model, whole, reset=False)
    restored, note = _restored_ttft_s(model, before, whole)
    return {"cold_ttft_ms": cold * 1000, "restored_ttft_ms": None if restored is None else restored * 1000,
            "hot_ttft_ms": hot * 1000, "restored_note": note, "turn": CHAT_TURNS, "prompt_tokens": len(whole)}


def _restored_ttft_s(model: Model, before: list[int], whole: list[int]) -> tuple[float | None, str | None]:
    """TTFT of ``whole`` with the earlier turns' KV state restored from the disk prompt cache
    (a private store, so nothing saved by earlier runs helps), or None and why not."""
    import tempfile

    from edge_runtime.models.prompt_cache import PromptCacheStore, attach

    with tempfile.TemporaryDirectory(prefix="edgert-anatomy-") as folder:
        if not attach(model, PromptCacheStore(Path(folder))):
            return None, "this backend cannot save its KV state (the prompt cache is llama.cpp's)"
        try:
            first_token_s(model, before)  # evaluates the earlier turns and saves their state
            model.disk.flush()  # type: ignore[attr-defined]  (attach succeeded: a llama.cpp model)
            drop_from_page_cache(folder)  # restored from storage, not from the page cache
            restored = first_token_s(model, whole)  # an empty cache in memory: the state comes from disk
        finally:
            attach(model, None)
    return restored, None


def http_ttft_s(job: dict[str, Any], prompt: str) -> float:
    """TTFT of ``prompt`` through ``edgert serve`` on loopback, streamed, after a warm-up request."""
    from edge_runtime.local_server import LOOPBACK, ServerNotReady, free_port, running_server

    settings = Settings.from_dict(job["settings"])
    port = free_port()
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", job["artifact_path"],
            "--backend", job["backend"], "--ctx", str(settings.n_ctx), "--port", str(port), "--parallel", "1",
            "--no-prompt-cache", "--force"]  # like the in-process figure: what earlier runs saved must
    # not help; --force: the bench's plan already decided this fits
    if job["backend"] == "llama.cpp":  # the bench plan's KV type: an explicit --ctx alone plans its own
        argv += ["--kv-cache-type", settings.type_k]
    if settings.n_threads:
        argv += ["--threads", str(settings.n_threads)]
    if settings.rpc_servers:
        argv += ["--workers", ",".join(settings.rpc_servers)]
    try:
        with running_server(argv, f"http://{LOOPBACK}:{port}/health", timeout=300):
            _streamed_ttft_s(LOOPBACK, port, "Hello there.")  # warm-up, another prompt: its cache is no help
            return _streamed_ttft_s(LOOPBACK, port, prompt)
    except ServerNotReady as exc:
        raise GenerationError(f"the anatomy's edgert serve did not start: {str(exc)[:300]}",
                              "run `edgert serve` with the same --model to see why") from None


def _streamed_ttft_s(host: str, port: int, prompt: str) -> float:
    body = json.dumps({"model": "default", "prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True})
    connection = http.client.HTTPConnection(host, port, timeout=300)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise GenerationError(f"the anatomy's server answered {response.status}: {response.read(300)!r}")
        while line := response.readline():
            if line.startswith(b"data: {"):
                return time.perf_counter() - started
        raise GenerationError("the anatomy's server ended its stream before any chunk")
    finally:
        connection.close()


def measure_anatomy(job: dict[str, Any], step: Any, prompt_tokens: Any) -> dict[str, Any]:
    """The four parts of the anatomy for one artifact (see the module docstring); ``prompt_tokens``
    is the bench worker's (the same prompts as the bench's own figures)."""
    from edge_runtime.backends import load_backend

    method, path = job["method"], job["artifact_path"]
    settings = Settings.from_dict(job["settings"])
    backend = load_backend(job["backend"])
    longest = max(method["prompt_tokens"])
    with backend.load(path, replace(settings, n_parallel=1)) as model:
        tokens = prompt_tokens(model, job["prompt_text"], longest)
        decode_prompt = tokens[: method["decode_prompt_tokens"]]
        prompt = model.detokenize(tokens[1:] if model.info.add_bos else tokens)
        first_token_s(model, tokens)  # warm-up
        in_process = first_token_s(model, model.tokenize(prompt, add_bos=model.info.add_bos))
        step("anatomy · in-process")
        cache = _cache(model, job["prompt_text"], max(8, longest // 2))
        step("anatomy · cache")
    storage = _storage(backend, path, settings, tokens)
    step("anatomy · storage")
    max_threads = settings.n_threads or 1
    compute = _compute(backend, path, settings, tokens, decode_prompt, method["gen_tokens"], max_threads)
    step("anatomy · compute")
    rpc = None
    if settings.rpc_servers:
        from edge_runtime.backends.llamacpp.rpc_ttft import rpc_ttft_ms

        rpc = rpc_ttft_ms(path, settings, tokens)
    http_s = http_ttft_s(job, prompt)
    step("anatomy · transfer")
    transfer = {"in_process_ttft_ms": in_process * 1000, "http_ttft_ms": http_s * 1000, "rpc_ttft_ms": rpc,
                "prompt_tokens": len(tokens)}
    return {"storage": storage, "compute": compute, "transfer": transfer, "cache": cache}
