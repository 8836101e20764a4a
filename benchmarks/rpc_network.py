#!/usr/bin/env python3
"""Decode speed of a model split across two RPC workers behind a simulated home network.

``rpc_split.py`` measures the RPC hop on loopback; a Pi on Wi-Fi adds bandwidth and delay. Here
each ``edgert worker`` runs in a network namespace of its own (``ip netns``), joined to this one
by a veth pair whose two sending sides are shaped with tc's ``tbf`` to ``--rate``. This kernel has
no ``netem``, so the link's delay is a relay (``--relay``, a child process of this script) that
holds every chunk it receives ``--delay-ms`` before passing it on, in each direction: a round trip
costs twice that. The main process (this one) holds the split, as ``edgert run --workers`` does.

Four ways to run the same greedy tokens from the same prompt, taking turns for ``--reps`` rounds
after one warm-up: local; split over two loopback workers; split over the shaped links; split
over the shaped links with the delay. The table shows the medians, the cost per token of each
against local, and, from the delay's cost, the round trips a token takes. It checks the four give
the same tokens. It reports; it never fails on a figure. Needs root (namespaces) and the RPC
backend (``scripts/enable_rpc.sh``). Everything stays on this machine.

    sudo .venv/bin/python benchmarks/rpc_network.py [--rate 50mbit] [--delay-ms 2] [--tokens 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from executables import find_edgert
from rpc_split import PROMPT, decode, serving, workers

from edge_runtime.backends.base import Settings
from edge_runtime.local_server import free_port

SUBNET = "10.77.{i}.{host}"  # one /24 per worker: .1 this side, .2 the worker's namespace
WORKER_PORT = 50052


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def link_name(i: int) -> str:
    """This side's end of the veth pair of namespace ``i``."""
    return f"ebh{i}x{os.getpid() % 10000}"


def link_bytes(indices: range) -> int:
    """Bytes sent and received so far on this side of the links ``indices``."""
    return sum(int(Path(f"/sys/class/net/{link_name(i)}/statistics/{kind}").read_text())
               for i in indices for kind in ("rx_bytes", "tx_bytes"))


@contextlib.contextmanager
def namespaces(count: int, rate: str) -> Iterator[list[str]]:
    """``count`` network namespaces, each joined to this one by a veth pair shaped to ``rate``."""
    names = [f"edgert-bench-w{i}-{os.getpid()}" for i in range(count)]
    try:
        for i, ns in enumerate(names):
            here, there = link_name(i), f"ebw{i}x{os.getpid() % 10000}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            sh("ip", "link", "set", there, "netns", ns)
            sh("ip", "addr", "add", SUBNET.format(i=i, host=1) + "/24", "dev", here)
            sh("ip", "link", "set", here, "up")
            inside = ("ip", "netns", "exec", ns)
            sh(*inside, "ip", "addr", "add", SUBNET.format(i=i, host=2) + "/24", "dev", there)
            sh(*inside, "ip", "link", "set", there, "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            shape = ("root", "tbf", "rate", rate, "burst", "64kb", "latency", "100ms")
            sh("tc", "qdisc", "add", "dev", here, *shape)  # this side → the worker
            sh(*inside, "tc", "qdisc", "add", "dev", there, *shape)  # the worker → this side
        yield names
    finally:
        for ns in names:  # deleting the namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@contextlib.contextmanager
def namespaced_workers(edgert: str, names: list[str], threads: int, first: int = 0) -> Iterator[tuple[str, ...]]:
    """One ``edgert worker`` inside each namespace, on its veth address (``names`` from the ``first``th)."""
    endpoints = tuple(f"{SUBNET.format(i=first + i, host=2)}:{WORKER_PORT}" for i in range(len(names)))
    processes = [subprocess.Popen(["ip", "netns", "exec", ns, edgert, "worker", "--host", e.rpartition(":")[0],
                                   "--port", str(WORKER_PORT), "--threads", str(threads)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
                 for ns, e in zip(names, endpoints, strict=True)]
    with serving(endpoints, processes, "worker") as ready:
        yield ready


@contextlib.contextmanager
def delayed(endpoints: tuple[str, ...], delay_ms: float) -> Iterator[tuple[str, ...]]:
    """A relay per endpoint, on loopback, holding every chunk ``delay_ms`` each way."""
    fronts = tuple(f"127.0.0.1:{free_port()}" for _ in endpoints)
    relays = [subprocess.Popen([sys.executable, __file__, "--relay", front, endpoint, str(delay_ms)],
                               stdin=subprocess.DEVNULL) for front, endpoint in zip(fronts, endpoints, strict=True)]
    with serving(fronts, relays, "relay", timeout_s=30) as ready:
        yield ready


def relay(listen: str, target: str, delay_ms: float) -> None:
    """Pass every connection to ``listen`` on to ``target``, each chunk ``delay_ms`` late, in order."""
    delay = delay_ms / 1000

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def hold_and_send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    writer.close()
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(hold_and_send())
        while chunk := await reader.read(1 << 16):
            queue.put_nowait((time.monotonic() + delay, chunk))
        queue.put_nowait((0.0, b""))
        await sender

    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        host, port = target.rsplit(":", 1)
        with contextlib.suppress(OSError):
            server_reader, server_writer = await asyncio.open_connection(host, int(port))
            for w in (client_writer, server_writer):  # RPC messages are small: never wait to fill a segment
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer),
                                 return_exceptions=True)

    async def serve() -> None:
        host, port = listen.rsplit(":", 1)
        server = await asyncio.start_server(connection, host, int(port))
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens to generate per run")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="threads of this process and of each worker")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--rate", default="50mbit", help="each link's bandwidth, each way (tc's units)")
    parser.add_argument("--delay-ms", type=float, default=2.0, help="each link's delay, each way")
    parser.add_argument("--edgert", default=None, help="the edgert to start the workers with")
    parser.add_argument("--relay", nargs=3, metavar=("LISTEN", "TARGET", "DELAY_MS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.relay:
        relay(args.relay[0], args.relay[1], float(args.relay[2]))
        return

    import edge_runtime
    from edge_runtime.backends.llamacpp import LlamaCppBackend, rpc

    status = rpc.library_status()
    if not status.available:
        print(f"llama.cpp's RPC backend is not available ({status.reason}): run scripts/enable_rpc.sh first")
        return
    if os.geteuid() != 0:
        print("network namespaces need root: run this as root (or use rpc_split.py for the loopback hop)")
        return
    edgert = find_edgert(args.edgert)
    path = args.model or str(edge_runtime.plan(ctx=args.ctx).artifact.path)
    print(f"model {os.path.basename(path)} · {args.tokens} tokens · {args.reps} rounds · {args.threads} thread(s) "
          f"each · links {args.rate} and {args.delay_ms:g} ms each way · load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    models = {}
    with contextlib.ExitStack() as stack:
        loopback = stack.enter_context(workers(edgert, 2, args.threads))
        names = stack.enter_context(namespaces(4, args.rate))  # a worker serves one client at a time
        shaped = stack.enter_context(namespaced_workers(edgert, names[:2], args.threads))
        slow = stack.enter_context(delayed(stack.enter_context(namespaced_workers(edgert, names[2:], args.threads,
                                                                                  first=2)), args.delay_ms))
        models["local"] = LlamaCppBackend.load(path, Settings(n_ctx=args.ctx, n_threads=args.threads))
        for label, endpoints in (("loopback", loopback), ("shaped", shaped), ("shaped+delay", slow)):
            plan = edge_runtime.plan(path, workers=endpoints, ctx=args.ctx, threads=args.threads)
            models[label] = LlamaCppBackend.load(path, plan.settings)
        for model in models.values():
            stack.callback(model.close)
        prompt = models["local"].tokenize(PROMPT, add_bos=models["local"].info.add_bos)
        figures: dict[str, list[float]] = {label: [] for label in models}
        tokens: dict[str, list[int]] = {}
        shaped_bytes = 0
        for round_ in range(args.reps + 1):
            for label, model in models.items():
                before = link_bytes(range(2)) if label == "shaped" else 0
                tok_s, tokens[label] = decode(model, prompt, args.tokens)
                if label == "shaped":
                    shaped_bytes = link_bytes(range(2)) - before
                if round_ > 0:  # round 0 warms every one up
                    figures[label].append(tok_s)
    medians = {label: statistics.median(values) for label, values in figures.items()}
    step = {label: 1000 / tok_s for label, tok_s in medians.items()}
    titles = {"local": "local", "loopback": "split, 2 loopback workers",
              "shaped": f"split, 2 links of {args.rate}", "shaped+delay": f"  ... and {args.delay_ms:g} ms each way"}
    print(f"{'':34}{'decode tok/s':>13}{'ms/token':>10}{'vs local':>10}")
    for label in models:
        print(f"{titles[label]:34}{medians[label]:>13.1f}{step[label]:>10.1f}{step[label] - step['local']:>+10.1f}")
    added = step["shaped+delay"] - step["shaped"]
    print(f"the delay costs {added:+.1f} ms a token: {added / (2 * args.delay_ms):.1f} round trips of "
          f"{2 * args.delay_ms:g} ms (the graph, the inputs and the results to and from each worker)")
    print(f"on the shaped links: {shaped_bytes / 1024:,.0f} KiB for the prompt and {args.tokens} tokens, both "
          "workers, both ways (most of it the graph ggml's RPC client sends each worker every step)")
    print(f"same greedy tokens: {'yes' if all(t == tokens['local'] for t in tokens.values()) else 'NO'}")


if __name__ == "__main__":
    sys.exit(main())
