#!/usr/bin/env python3
"""Server load: ``edgert serve`` against llama-cpp-python's own server, 1 and 4 concurrent chats.

Three measurements, side by side in one run:

1. **Raw batching ratio** (the limit), in-process: one ``LlamaCppModel`` with 4 slots, greedy
   counting prompt, ``--raw-tokens`` tokens per stream; aggregate generated tokens/s with 4 slots
   generating at once (one thread per slot) ÷ one slot alone. ``--reps`` rounds, interleaved,
   medians.
2. **edgert serve** (``--parallel 4``) and 3. **llama-cpp-python's server**
   (``python -m llama_cpp.server``; same model, threads, ctx, n_batch and flash attention), both
   driven by the official ``openai`` client: 1 client, then 4 concurrent clients, each holding a
   ``--turns``-turn streaming chat (each turn appends the answer and a new user message, so later
   turns can reuse the cached prompt), ``--max-tokens`` per answer, temperature 0. Per turn: TTFT
   (request sent → first content chunk). Per phase: aggregate tokens/s (completion tokens ÷ phase
   wall time), answers that came back empty or cut short (no finish_reason, no ``[DONE]``, or no
   content), errors. ``--rounds`` rounds interleave the servers; TTFTs are pooled, tokens/s is
   the median over rounds. Every conversation starts with its own tag, so no phase finds another
   phase's answers in a cache.

Targets (printed with the figures; the script reports, it never fails):
- 1 client: edgert p50 TTFT on turns 2–5 ≤ llama-cpp-python's;
- 4 clients: every edgert answer complete;
- edgert aggregate tokens/s, 4 clients ÷ 1 client ≥ 0.95 × the raw batching ratio of (1)
  (the issue's own floor is 1.5×);
- edgert p50 TTFT (turns 2–5) at 4 clients ≤ 2 × the 1-client p50.

llama-cpp-python's server needs its extras: ``.venv/bin/pip install "llama-cpp-python[server]"``
(or ``pip install fastapi sse-starlette starlette-context pydantic-settings``); without them that
column is skipped with a message. Usage: ``.venv/bin/python benchmarks/server_load.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from edge_runtime.local_server import LOOPBACK, free_port, running_server

RAW_PROMPT = "1, 2, 3, 4, 5, 6,"
TOPICS = (
    "I want to start growing vegetables on my balcony.",
    "I am learning to play the guitar.",
    "I would like to bake my own bread at home.",
    "I am planning a cycling trip along a river.",
    "I want to keep my laptop running well for years.",
)
FOLLOW_UPS = ("What should I do first?", "What mistakes do beginners make?",
              "Can you give me a concrete example?", "How long until I see results?",
              "Summarise your advice in two sentences.", "Anything else I should know?")
ENGINES = {"edgert": "edgert serve", "llama": "llama-cpp-python"}


@dataclass
class Turn:
    """One request of a chat, as the client saw it."""

    ttft_s: float | None = None
    tokens: int = 0
    content: str = ""
    finish: str | None = None
    saw_done: bool = False
    error: str | None = None

    @property
    def incomplete(self) -> bool:
        return self.error is None and (self.finish is None or not self.saw_done or not self.content)


@dataclass
class Phase:
    """One server × client count, pooled over rounds."""

    turns: list[list[Turn]] = field(default_factory=list)  # one list per chat
    tok_s: list[float] = field(default_factory=list)  # one per round
    prompt_tokens: float = 0.0  # edgert only, from /metrics: prompt tokens, and those from the cache
    cached_tokens: float = 0.0


# -- 1. raw batching ratio ------------------------------------------------------------------------

def raw_ratio(path: str, threads: int, ctx: int, n_tokens: int, reps: int) -> tuple[float, float, list[str]]:
    """Median aggregate tokens/s of 1 and of 4 slots generating at once, in-process."""
    from edge_runtime.backends.base import SamplingParams, Settings
    from edge_runtime.backends.llamacpp.model import LlamaCppModel

    model = LlamaCppModel(path, Settings(n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_parallel=4))
    notes: list[str] = []
    try:
        prompt = model.tokenize(RAW_PROMPT, add_bos=model.info.add_bos)
        params = SamplingParams(temperature=0.0, max_tokens=n_tokens)

        def stream(out: list[tuple[float, float, int]], barrier: threading.Barrier) -> None:
            with model.acquire_slot(prompt, timeout=60) as slot:
                barrier.wait(timeout=60)
                start, count = time.perf_counter(), 0
                for ev in slot.generate(prompt, params):
                    count += ev.token is not None
                out.append((start, time.perf_counter(), count))

        def once(n_slots: int) -> float:
            out: list[tuple[float, float, int]] = []
            barrier = threading.Barrier(n_slots)
            workers = [threading.Thread(target=stream, args=(out, barrier)) for _ in range(n_slots)]
            for w in workers:
                w.start()
            for w in workers:
                w.join(timeout=300)
            if len(out) != n_slots:
                raise RuntimeError(f"{n_slots - len(out)} raw streams did not finish")
            short = [c for *_, c in out if c != n_tokens]
            if short:
                notes.append(f"{n_slots} slots: streams stopped at {short} tokens, not {n_tokens}")
            return sum(c for *_, c in out) / (max(e for _, e, _ in out) - min(s for s, _, _ in out))

        once(4)  # warm-up: fills every slot's cache with the prompt
        single, batched = [], []
        for _ in range(reps):
            single.append(once(1))
            batched.append(once(4))
    finally:
        model.close()
    return statistics.median(single), statistics.median(batched), notes


# -- clients --------------------------------------------------------------------------------------

class DoneSpy(httpx.HTTPTransport):
    """Notes whether the last response's bytes held ``data: [DONE]`` (the openai client hides it)."""

    saw_done = False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.saw_done = False
        spy = self

        class Watched(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                tail = b""
                for chunk in response.stream:  # type: ignore[union-attr]
                    if b"data: [DONE]" in tail + chunk:
                        spy.saw_done = True
                    tail = chunk[-16:]
                    yield chunk

            def close(self) -> None:
                response.close()

        return httpx.Response(response.status_code, headers=response.headers, stream=Watched(),
                              extensions=response.extensions, request=request)


def chat(port: int, tag: str, topic: str, turns: int, max_tokens: int) -> list[Turn]:
    """One client: a multi-turn streaming chat; every answer goes back into the history."""
    from openai import OpenAI

    spy = DoneSpy()
    client = OpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key="none", max_retries=0,
                    timeout=180.0, http_client=httpx.Client(transport=spy, timeout=180.0))
    messages: list[dict[str, str]] = [
        {"role": "system", "content": f"Conversation {tag}. You are a helpful assistant."},
        {"role": "user", "content": topic}]
    out: list[Turn] = []
    try:
        for i in range(turns):
            turn = Turn()
            start = time.perf_counter()
            chunks = 0
            try:
                stream = client.chat.completions.create(
                    model="default", messages=messages, max_tokens=max_tokens, temperature=0,
                    stream=True, stream_options={"include_usage": True})  # type: ignore[arg-type]
                for chunk in stream:
                    if chunk.usage is not None:
                        turn.tokens = chunk.usage.completion_tokens
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.delta and choice.delta.content:
                        if turn.ttft_s is None:
                            turn.ttft_s = time.perf_counter() - start
                        turn.content += choice.delta.content
                        chunks += 1
                    if choice.finish_reason is not None:
                        turn.finish = choice.finish_reason
            except Exception as exc:  # an error is a figure here, not a crash
                turn.error = f"{type(exc).__name__}: {str(exc)[:120]}"
            turn.saw_done = spy.saw_done
            turn.tokens = turn.tokens or chunks  # llama-cpp-python sends no usage: a chunk is a token
            out.append(turn)
            messages += [{"role": "assistant", "content": turn.content},
                         {"role": "user", "content": FOLLOW_UPS[i % len(FOLLOW_UPS)]}]
    finally:
        client.close()
    return out


def prompt_counters(port: int) -> tuple[float, float]:
    """edgert's (prompt tokens, prompt tokens served from the cache) so far; zeros elsewhere."""
    found = {"edgert_prompt_tokens_total": 0.0, "edgert_cached_prompt_tokens_total": 0.0}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        for line in httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=10.0).text.splitlines():
            name, _, value = line.partition(" ")
            if name in found:
                found[name] = float(value)
    return found["edgert_prompt_tokens_total"], found["edgert_cached_prompt_tokens_total"]


def run_phase(port: int, tag: str, n_clients: int, args: argparse.Namespace, phase: Phase) -> None:
    """n_clients chats at once; adds their turns and the aggregate tokens/s to ``phase``."""
    before = prompt_counters(port)
    with ThreadPoolExecutor(n_clients) as pool:
        start = time.perf_counter()
        futures = [pool.submit(chat, port, f"{tag}-{i}", TOPICS[i % len(TOPICS)], args.turns, args.max_tokens)
                   for i in range(n_clients)]
        chats = [f.result(timeout=args.turns * 300) for f in futures]
        wall = time.perf_counter() - start
    phase.turns += chats
    after = prompt_counters(port)
    phase.prompt_tokens += after[0] - before[0]
    phase.cached_tokens += after[1] - before[1]
    phase.tok_s.append(sum(t.tokens for c in chats for t in c) / wall)


# -- report ---------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """Percentile by linear interpolation; nan when there are no values."""
    if not values:
        return float("nan")
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (k - lo)


def ttfts(phase: Phase, first: int, last: int) -> list[float]:
    return [t.ttft_s for c in phase.turns for t in c[first - 1:last] if t.ttft_s is not None]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def report(phases: dict[tuple[str, int], Phase], raw: tuple[float, float, list[str]] | None, turns: int) -> None:
    ms = lambda x: f"{x * 1000:8.1f}"
    print(f"\n{'server':<18} {'clients':>7} {'TTFT p50 t2-' + str(turns):>13} {'p95':>8} {'t1 p50':>8} "
          f"{'agg tok/s':>10} {'answers':>8} {'empty/cut':>10} {'errors':>7}   (ms)")
    for (engine, n), ph in phases.items():
        later = ttfts(ph, 2, turns)
        flat = [t for c in ph.turns for t in c]
        print(f"{ENGINES[engine]:<18} {n:>7} {ms(pct(later, .5)):>13} {ms(pct(later, .95))} "
              f"{ms(pct(ttfts(ph, 1, 1), .5))} {statistics.median(ph.tok_s):>10.1f} {len(flat):>8} "
              f"{sum(t.incomplete for t in flat):>10} {sum(t.error is not None for t in flat):>7}")
    print("\nper-turn TTFT, median ms (n answers with content)")
    print(f"{'server':<18} {'clients':>7} " + " ".join(f"{'turn ' + str(i + 1):>12}" for i in range(turns)))
    for (engine, n), ph in phases.items():
        cells = [ttfts(ph, i + 1, i + 1) for i in range(turns)]
        print(f"{ENGINES[engine]:<18} {n:>7} " + " ".join(f"{ms(pct(c, .5))} ({len(c):>2})" for c in cells))
    for (engine, n), ph in phases.items():
        kinds = Counter(t.error or f"finish_reason={t.finish} [DONE]={'yes' if t.saw_done else 'no'} "
                        f"content={bool(t.content)}" for c in ph.turns for t in c if t.incomplete or t.error)
        if kinds:
            print(f"  {ENGINES[engine]} × {n}: " + "; ".join(f"{v}× {k}" for k, v in kinds.items()))
        if ph.prompt_tokens:
            print(f"  {ENGINES[engine]} × {n}: {ph.cached_tokens / ph.prompt_tokens:.0%} of "
                  f"{ph.prompt_tokens:.0f} prompt tokens served from the KV cache (its /metrics)")

    print("\nratios and targets")
    e1, e4 = phases.get(("edgert", 1)), phases.get(("edgert", 4))
    l1, l4 = phases.get(("llama", 1)), phases.get(("llama", 4))
    if raw is not None:
        single, batched, notes = raw
        print(f"  raw batching (in-process): 1 slot {single:.1f} tok/s, 4 slots {batched:.1f} tok/s "
              f"-> ratio {div(batched, single):.2f}")
        for note in notes:
            print(f"    note: {note}")
    if e1 and l1:
        a, b = pct(ttfts(e1, 2, turns), .5), pct(ttfts(l1, 2, turns), .5)
        print(f"  1 client, p50 TTFT t2-{turns}: edgert {a * 1000:.1f} ms vs llama-cpp-python {b * 1000:.1f} ms "
              f"-> {div(a, b):.3f} (target <= 1.00: {verdict(a <= b)})")
    if e4:
        flat = [t for c in e4.turns for t in c]
        ok = sum(not t.incomplete and t.error is None for t in flat)
        print(f"  4 clients, complete answers: edgert {ok}/{len(flat)} (target all: {verdict(ok == len(flat))})"
              + (f"; llama-cpp-python {sum(not t.incomplete and t.error is None for c in l4.turns for t in c)}"
                 f"/{sum(len(c) for c in l4.turns)}" if l4 else ""))
    if e1 and e4:
        scale = div(statistics.median(e4.tok_s), statistics.median(e1.tok_s))
        line = f"  edgert aggregate 4 ÷ 1 clients: {scale:.2f} (issue floor 1.5: {verdict(scale >= 1.5)})"
        if raw is not None:
            r = div(raw[1], raw[0])
            line += (f"; raw ratio {r:.2f}; {scale:.2f} / {r:.2f} = {div(scale, r):.3f} "
                     f"(target >= 0.95: {verdict(div(scale, r) >= 0.95)})")
        print(line)
        a, b = pct(ttfts(e4, 2, turns), .5), pct(ttfts(e1, 2, turns), .5)
        print(f"  edgert p50 TTFT t2-{turns}, 4 ÷ 1 clients: {a * 1000:.1f} / {b * 1000:.1f} ms = {div(a, b):.3f} "
              f"(target <= 2.00: {verdict(a <= 2 * b)})")
    if l1 and l4:
        print(f"  llama-cpp-python for reference: aggregate 4 ÷ 1 = "
              f"{div(statistics.median(l4.tok_s), statistics.median(l1.tok_s)):.2f}, p50 TTFT 4 ÷ 1 = "
              f"{div(pct(ttfts(l4, 2, turns), .5), pct(ttfts(l1, 2, turns), .5)):.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="A .gguf file or store name (default: smollm2).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048, help="Context per conversation (slot).")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="Server rounds (servers interleaved).")
    ap.add_argument("--raw-tokens", type=int, default=128, help="Tokens per stream in the raw ratio.")
    ap.add_argument("--reps", type=int, default=3, help="Repetitions of the raw ratio.")
    ap.add_argument("--skip-llama-cpp-server", action="store_true")
    args = ap.parse_args()

    from edge_runtime.models.spec import resolve_model

    path = str(resolve_model(args.model or "smollm2"))  # a .gguf path, a store name or "smollm2"
    import llama_cpp
    import openai

    print(f"model {path}\nthreads {args.threads} · ctx {args.ctx} · {args.turns} turns · max_tokens "
          f"{args.max_tokens} · temperature 0 · {args.rounds} rounds · llama-cpp-python "
          f"{llama_cpp.__version__} · openai {openai.__version__}")
    omp = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_"))}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)"
          f" · OpenMP env: {omp or 'unset'}")
    sys.stdout.flush()

    raw = raw_ratio(path, args.threads, args.ctx, args.raw_tokens, args.reps)
    engines = ["edgert"]
    if args.skip_llama_cpp_server:
        print("llama-cpp-python server: skipped (--skip-llama-cpp-server)")
    else:
        import importlib.util

        missing = [m for m in ("fastapi", "pydantic_settings", "sse_starlette", "starlette_context")
                   if importlib.util.find_spec(m) is None]
        if missing:
            print(f"llama-cpp-python server: skipped, its extras are missing ({', '.join(missing)}); install them "
                  f"with `.venv/bin/pip install \"llama-cpp-python[server]\"`")
        else:
            engines.append("llama")
    ports = {e: free_port() for e in engines}
    t = str(args.threads)
    argv = {
        "edgert": [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", path, "--port", str(ports["edgert"]),
                   "--parallel", "4", "--ctx", str(args.ctx), "--threads", t],
        "llama": [sys.executable, "-m", "llama_cpp.server", "--model", path, "--host", LOOPBACK,
                  "--port", str(ports.get("llama", 0)), "--n_threads", t, "--n_threads_batch", t,
                  "--n_ctx", str(args.ctx), "--n_batch", "512", "--flash_attn", "true"],
    }
    ready = {"edgert": "/health", "llama": "/v1/models"}  # llama-cpp-python has no /health
    phases: dict[tuple[str, int], Phase] = {(e, n): Phase() for e in engines for n in (1, 4)}
    with contextlib.ExitStack() as stack:
        for e in engines:
            stack.enter_context(running_server(argv[e], f"http://{LOOPBACK}:{ports[e]}{ready[e]}"))
            # First-request costs (and a first batch of 4 sequences) stay out of the figures.
            run_phase(ports[e], f"warmup-{e}", 4, argparse.Namespace(turns=1, max_tokens=8), Phase())
        for rnd in range(args.rounds):
            for e in engines:
                for n in (1, 4):
                    run_phase(ports[e], f"{e}-{rnd}-{n}", n, args, phases[(e, n)])
                    print(f"  round {rnd + 1}: {ENGINES[e]} × {n} clients: {phases[(e, n)].tok_s[-1]:.1f} tok/s",
                          file=sys.stderr)
    report(phases, raw, args.turns)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
