#!/usr/bin/env python3
"""Decode speed of a model split across two llama.cpp RPC workers on loopback, against the same model local.

Two real ``edgert worker`` processes on free 127.0.0.1 ports; the split is the planner's
(``edge_runtime.plan(..., workers=...)``: every layer on the workers, divided by their free
memory), held by edgert's child process (``RemoteModel``); the local model is the same GGUF
file with the same context and threads, in this process. Both generate the same greedy tokens
from the same prompt, taking turns for ``--reps`` rounds after one warm-up; the table shows the
medians and the ratio split ÷ local, which on one machine is the cost of the RPC hop itself
(about eight small messages a token: a graph recompute, the inputs, the logits), not of a
network. The script checks that both give the same tokens. It reports; it never fails on a
figure.

Needs the RPC backend: ``scripts/enable_rpc.sh`` first.

    .venv/bin/python benchmarks/rpc_split.py [--tokens 64] [--reps 3] [--threads 1] [--model PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

from executables import find_edgert

from edge_runtime.backends.base import Model, SamplingParams, Settings
from edge_runtime.local_server import LOOPBACK, free_port

PROMPT = "The following is a detailed history of the city of Rome, from its legendary founding to the present day."


@contextlib.contextmanager
def serving(endpoints: tuple[str, ...], processes: list[subprocess.Popen], what: str,
            timeout_s: float = 60) -> Iterator[tuple[str, ...]]:
    """``endpoints`` once each answers a TCP connect (a process that dies first is an error); the
    processes are killed afterwards."""
    from edge_runtime.backends.llamacpp import rpc
    from edge_runtime.errors import WorkerUnavailableError

    try:
        for endpoint, process in zip(endpoints, processes, strict=True):
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    rpc.check_reachable(endpoint, timeout=1)
                    break
                except WorkerUnavailableError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the {what} on {endpoint} did not start") from None
                    time.sleep(0.2)
        yield endpoints
    finally:
        for process in processes:
            process.kill()
            process.wait()


@contextlib.contextmanager
def workers(edgert: str, count: int, threads: int) -> Iterator[tuple[str, ...]]:
    """``count`` real ``edgert worker`` processes on loopback, stopped afterwards."""
    endpoints = tuple(f"{LOOPBACK}:{free_port()}" for _ in range(count))
    processes = [subprocess.Popen([edgert, "worker", "--port", e.rpartition(":")[2], "--threads", str(threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
                 for e in endpoints]
    with serving(endpoints, processes, "worker") as ready:
        yield ready


def decode(model: Model, tokens: list[int], n: int) -> tuple[float, list[int]]:
    """Decode tok/s of one greedy generation from an empty cache, and its tokens."""
    model.reset()
    events = list(model.generate(tokens, SamplingParams(max_tokens=n, temperature=0.0)))
    stats = events[-1].stats
    assert stats is not None
    return stats.decode_tok_s, [e.token for e in events if e.token is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens to generate per run")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="threads of this process and of each worker")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--edgert", default=None, help="the edgert to start the workers with")
    args = parser.parse_args()

    import edge_runtime
    from edge_runtime.backends.llamacpp import LlamaCppBackend, rpc

    status = rpc.library_status()
    if not status.available:
        print(f"llama.cpp's RPC backend is not available ({status.reason}): run scripts/enable_rpc.sh first")
        return
    path = args.model or str(edge_runtime.plan(ctx=args.ctx).artifact.path)
    print(f"model {os.path.basename(path)} · {args.tokens} tokens · {args.reps} rounds · {args.threads} thread(s) "
          f"each · load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    with workers(find_edgert(args.edgert), 2, args.threads) as endpoints:
        plan = edge_runtime.plan(path, workers=endpoints, ctx=args.ctx, threads=args.threads)
        print("split: " + " · ".join(f"{w.endpoint} {w.layers} layers" for w in plan.workers)
              + f" · {plan.settings.n_gpu_layers} of the model's layers on the workers")
        started = time.perf_counter()
        split = LlamaCppBackend.load(path, plan.settings)
        split_load = time.perf_counter() - started
        started = time.perf_counter()
        local = LlamaCppBackend.load(path, Settings(n_ctx=args.ctx, n_threads=args.threads))
        local_load = time.perf_counter() - started
        try:
            prompt = local.tokenize(PROMPT, add_bos=local.info.add_bos)
            figures: dict[str, list[float]] = {"local": [], "split": []}
            same = True
            for round_ in range(args.reps + 1):
                local_tok_s, local_tokens = decode(local, prompt, args.tokens)
                split_tok_s, split_tokens = decode(split, prompt, args.tokens)
                same = same and local_tokens == split_tokens
                if round_ > 0:  # round 0 warms both up
                    figures["local"].append(local_tok_s)
                    figures["split"].append(split_tok_s)
        finally:
            split.close()
            local.close()
    medians = {name: statistics.median(values) for name, values in figures.items()}
    print(f"{'':28}{'decode tok/s (median)':>22}{'load s':>9}")
    print(f"{'local':28}{medians['local']:>22.1f}{local_load:>9.2f}")
    print(f"{'split over 2 loopback workers':28}{medians['split']:>22.1f}{split_load:>9.2f}")
    print(f"split ÷ local: {medians['split'] / medians['local']:.2f} "
          f"(per token {1000 / medians['split'] - 1000 / medians['local']:+.1f} ms for the RPC hop)")
    print(f"same greedy tokens: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
