#!/usr/bin/env python3
"""The prompt cache on disk across a restart, and one system prompt shared by four server clients.

Part 1, a restart. A child process grows a 10-turn chat to about 2,000 tokens (SmolLM2, ctx 4096,
long user turns of Python documentation prose) with the prompt cache on disk, saves the
conversation, then measures the TTFT of an 11th turn while the conversation is still in memory
(``hot``: the process that never stopped; the disk cache off, so it saves nothing more; before
each repetition its cache goes back to exactly the 10 turns, so it evaluates the tokens a
restarted process evaluates after the restore, each row's count printed beside it). Then,
repetitions interleaved, fresh processes load the model and the saved conversation and send the
same 11th turn: ``restored`` with a copy of the store the first child left, ``cold`` with the
prompt cache off (the whole conversation evaluated again). Each repetition sends another 11th
message, the same one to all three. Each restarted process first answers a short unrelated
prompt with the disk cache detached, so its first call's own costs (compute buffers, the thread
pool) count against neither the restore nor the re-prefill; one more restored row without that
shows what the very first request after a restart pays. Targets: restored ÷ hot ≤ 1.3; restored
÷ cold is the saving.

Part 2, four clients. ``edgert serve --parallel 4`` gets four chat requests at once that share a
500-token system prompt, then four whose system prompts all differ; the prompt tokens the server
evaluated (prompt tokens − ``usage.prompt_tokens_details.cached_tokens``) should be about 1× the
system prompt, not 4×.

The script reports; it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from edge_runtime.sample_text import python_docs_text

CTX = 4096
TURNS = 10
CHARS_PER_TURN = 760  # about 170 tokens of prose per user turn: ~2,000 tokens after 10 turns
ANSWER_TOKENS = 24
FOLLOW_UPS = ("And in one sentence, what connects all of this?", "Which part of it matters most, and why?",
              "Give me one example of the first topic.", "What would you read next?")


def user_turn(prose: str, i: int) -> str:
    start = 5_000 + i * CHARS_PER_TURN
    return f"Here is part {i + 1} of my notes; summarise it briefly.\n\n{prose[start:start + CHARS_PER_TURN]}"


def load(prompt_cache: bool, threads: int) -> Any:
    import edge_runtime
    from edge_runtime.backends.base import Settings

    return edge_runtime.load("smollm2", Settings(n_ctx=CTX, n_threads=threads), prompt_cache=prompt_cache)


def turn_stats(session: Any, text: str) -> dict[str, Any]:
    for _ in session.send(text):
        pass
    stats = session.last_turn.stats
    return {"ttft_s": stats.ttft_s, "prompt_tokens": stats.prompt_tokens, "cached_tokens": stats.cached_tokens,
            "evaluated_tokens": stats.evaluated_tokens}


def child_grow(conversation: Path, reps: int, threads: int) -> dict[str, Any]:
    """Grow the chat with the disk cache on, save it, then measure the hot 11th turns."""
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.session import Session

    prose = python_docs_text()
    model = load(True, threads)
    session = Session(model, params=SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))
    grown = [turn_stats(session, user_turn(prose, i)) for i in range(TURNS)]
    session.save(conversation)
    model.disk.flush()
    model.use_prompt_cache(None)  # the hot turns must leave the store as the restart finds it
    with model.acquire_slot() as slot:
        held = list(slot.prefix.tokens)  # what the cache holds after 10 turns: what was saved
    hot = []
    for r in range(reps):
        # Back to exactly the 10 turns' tokens (one evaluated again), so each hot turn evaluates
        # the tokens a restarted process evaluates after the restore; the previous follow-up
        # would otherwise lend it the start of the user turn's template.
        list(model.generate(held, SamplingParams(max_tokens=1, temperature=0.0)))
        hot.append(turn_stats(session, FOLLOW_UPS[r % len(FOLLOW_UPS)]))
        del session.messages[-2:]  # back to 10 turns
    model.close()
    return {"grown": grown, "hot": hot}


def child_next_turn(conversation: Path, rep: int, prompt_cache: bool, threads: int, warm: bool) -> dict[str, Any]:
    """A restarted process: load the model and the conversation, send the 11th turn (``warm``:
    after a short unrelated answer with the disk cache detached, so the first call's own costs,
    compute buffers and the thread pool, are not counted against the restore or the re-prefill)."""
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.models.prompt_cache import PromptCacheStore
    from edge_runtime.session import Session, read_conversation

    model = load(prompt_cache, threads)
    if warm:
        model.use_prompt_cache(None)
        list(model.generate(model.tokenize("Hello there."), SamplingParams(max_tokens=2, temperature=0.0)))
        model.reset()
        model.use_prompt_cache(PromptCacheStore.default() if prompt_cache else None)
    session = Session(model, params=SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))
    session.restore(*read_conversation(conversation))
    out = turn_stats(session, FOLLOW_UPS[rep % len(FOLLOW_UPS)])
    model.close()
    return out


def run_child(home: Path, *args: str) -> dict[str, Any]:
    env = {**os.environ, "EDGERT_HOME": str(home)}
    done = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def part_restart(work: Path, reps: int, threads: int) -> None:
    grow_home = work / "grow"
    conversation = work / "conversation.json"
    t0 = time.perf_counter()
    grown = run_child(grow_home, "grow", str(conversation), str(reps), str(threads))
    print(f"grew {TURNS} turns to {grown['grown'][-1]['prompt_tokens']} prompt tokens in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    rows: dict[str, list[dict[str, Any]]] = {"hot": grown["hot"], "restored, first call": [], "restored": [],
                                             "cold": []}
    for r in range(reps):  # interleaved: restored (first call, then warm), cold, then again
        for name, cache, warm in (("restored, first call", "on", "cold"), ("restored", "on", "warm"),
                                  ("cold", "off", "warm")):
            home = work / f"{name.replace(', ', '-')}-{r}"
            if cache == "on":
                shutil.copytree(grow_home / "prompt-cache", home / "prompt-cache")
            rows[name].append(run_child(home, "next", str(conversation), str(r), cache, str(threads), warm))
        print(f"rep {r + 1}: " + " · ".join(f"{n} {v[r]['ttft_s'] * 1000:.0f} ms ({v[r]['evaluated_tokens']} evaluated)"
                                             for n, v in rows.items()), flush=True)
    print(f"\n11th turn after {TURNS} (SmolLM2, ctx {CTX}); every restarted process but the first-call "
          "row answered a short unrelated prompt first:")
    print(f"{'':22} {'TTFT ms (median)':>17} {'prompt':>7} {'cached':>7} {'evaluated':>10}")
    med = {n: statistics.median(r["ttft_s"] for r in v) for n, v in rows.items()}
    for name, v in rows.items():
        print(f"{name:22} {med[name] * 1000:>17.0f} {v[0]['prompt_tokens']:>7} {v[0]['cached_tokens']:>7} "
              f"{v[0]['evaluated_tokens']:>10}")
    print(f"restored ÷ hot  = {med['restored'] / med['hot']:.2f}  (target ≤ 1.3; first call: "
          f"{med['restored, first call'] / med['hot']:.2f})")
    print(f"restored ÷ cold = {med['restored'] / med['cold']:.3f}  (cold ÷ restored = "
          f"{med['cold'] / med['restored']:.1f}×)", flush=True)


def chat_request(url: str, system: str, question: str, out: list[dict[str, Any]]) -> None:
    body = json.dumps({"model": "default", "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}]})
    request = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=900) as response:
        usage = json.loads(response.read())["usage"]
    out.append({"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"],
                "latency_s": time.perf_counter() - start})


def four_clients(url: str, systems: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    threads = [threading.Thread(target=chat_request, args=(url, s, q, out))
               for s, q in zip(systems, FOLLOW_UPS, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def part_shared_system_prompt(work: Path, reps: int, threads: int) -> None:
    from edge_runtime.local_server import free_port, running_server

    prose = python_docs_text()
    system = "You answer questions about these notes.\n\n" + prose[40_000:42_300]  # about 500 tokens
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    edgert = str(Path(sys.executable).with_name("edgert"))
    argv = [edgert, "serve", "--model", "smollm2", "--parallel", "4", "--ctx", "2048", "--port", str(port),
            "--threads", str(threads), "--no-prompt-cache"]
    os.environ["EDGERT_HOME"] = str(work / "serve")
    print("\nfour clients at once, one ~500-token system prompt (edgert serve --parallel 4):", flush=True)
    with running_server(argv, url + "/health"):
        for r in range(reps):  # interleaved: shared, then all different
            # Each round opens with its own line, so no slot holds any of it from an earlier round.
            shared = [f"Round {r}, shared. " + system] * 4
            different = [f"Round {r}, notes {i} of 4.\n\n" + prose[50_000 + i * 2400:52_300 + i * 2400]
                         for i in range(4)]
            for name, systems in (("shared", shared), ("different", different)):
                rows = four_clients(url, systems)
                evaluated = sum(x["prompt"] - x["cached"] for x in rows)
                print(f"rep {r + 1} {name:9}: prompt tokens {sum(x['prompt'] for x in rows):>5} · evaluated "
                      f"{evaluated:>5} · cached {sum(x['cached'] for x in rows):>5} · slowest answer "
                      f"{max(x['latency_s'] for x in rows):.1f} s", flush=True)
                if name == "shared":
                    one = min(x["prompt"] for x in rows)
                    print(f"           evaluated ÷ one request's prompt = {evaluated / one:.2f} (1× not 4×)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--part", choices=("restart", "server", "both"), default="both")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, conversation, *rest = args.child
        if kind == "grow":
            result = child_grow(Path(conversation), int(rest[0]), int(rest[1]))
        else:
            result = child_next_turn(Path(conversation), int(rest[0]), rest[1] == "on", int(rest[2]),
                                     rest[3] == "warm")
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="edgert-prompt-cache-bench-") as tmp:
        if args.part in ("restart", "both"):
            part_restart(Path(tmp), args.reps, args.threads)
        if args.part in ("server", "both"):
            part_shared_system_prompt(Path(tmp), args.reps, args.threads)


if __name__ == "__main__":
    main()
