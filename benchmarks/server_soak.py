#!/usr/bin/env python3
"""Server soak: ``--minutes`` of mixed, partly hostile traffic against a real ``edgert serve``.

``edgert serve`` runs as a child process (``--api-key``, ``--parallel 2 --queue 4`` by default so
floods overflow the queue). ``--clients`` workers send, at random (seeded), valid chats (streamed
and not), streams they cut after two chunks, malformed JSON, 2 MiB bodies, 100,000-deep nested
bodies, wrong API keys and wrong Host headers; every 20 s a flood of ``parallel + queue + 4``
chats arrives at once, and every 15 s five connections send half a request head and wait.

Printed: requests by kind × outcome (HTTP status, ``cut`` for streams closed by the client,
``closed``/``left-open`` for half heads), p50/p95 latency of the valid requests answered 200 per
minute, the server's RSS at start, after warm-up (``--warmup`` s, default a fifth of the run,
at most 60) and at the end. Targets, with a verdict (the script reports, it never fails):

- no 5xx other than a 503 with ``Retry-After``;
- 0 lost valid requests: each gets a complete answer (a finish reason; ``[DONE]`` when streamed)
  or an explicit 429/503;
- every half-sent head disconnected by the server;
- RSS growth after warm-up under 5%.

Usage: ``.venv/bin/python benchmarks/server_soak.py --minutes 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import psutil

from edge_runtime.local_server import LOOPBACK, free_port, running_server

KEY = "soak-key"
# Kind → weight for the workers' random draw (floods and half heads run on their own timers).
WEIGHTS = {"chat": 30, "stream": 30, "cut_stream": 10, "malformed_json": 6, "oversized_body": 4, "deep_body": 4,
           "wrong_key": 8, "wrong_host": 8}
FLOOD_EVERY_S = 20.0
HALF_HEADS_EVERY_S = 15.0
HALF_HEADS_AT_ONCE = 5
MIB = 1 << 20

PROMPTS = ("Name a colour.", "What is a river?", "Say hello in French.", "Count to five.",
           "What do bees make?", "Name a planet.", "What is rain?", "Give me a word for happy.")
# Valid kinds end with a complete answer or an explicit 429/503 (with Retry-After); else lost.
VALID_KINDS = ("chat", "stream", "flood")
HALF_HEAD_GUARD_S = 60.0  # a head the server leaves open this long counts as "left open"


@dataclass
class Record:
    """One request as the client saw it."""

    kind: str
    outcome: str  # the HTTP status, or: cut, closed, left-open, error
    started: float  # seconds since the soak began
    latency_s: float
    lost: bool = False  # a valid request without a complete answer or an explicit 429/503
    bad_5xx: bool = False  # a 5xx other than a 503 with Retry-After
    retry_after_s: float = 0.0  # what a 429/503 asked the client to wait

    @property
    def valid(self) -> bool:
        return self.kind in VALID_KINDS


class Traffic:
    """Requests against one server; ``t0`` is when the soak began."""

    def __init__(self, base: str, key: str, max_tokens: int, t0: float) -> None:
        self.base, self.key, self.max_tokens, self.t0 = base, key, max_tokens, t0
        self.port = int(base.rsplit(":", 1)[1])

    def _headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def _body(self, i: int, stream: bool = False) -> dict:
        return {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": self.max_tokens,
                "temperature": 0.7, "stream": stream}

    def _record(self, kind: str, start: float, res: httpx.Response | None, outcome: str | None = None,
                complete: bool = True) -> Record:
        status = res.status_code if res is not None else None
        shed = status in (429, 503) and res is not None and "retry-after" in res.headers
        record = Record(kind, outcome or str(status), start - self.t0, time.monotonic() - start)
        record.bad_5xx = status is not None and status >= 500 and not shed
        if shed:
            record.retry_after_s = float(res.headers["retry-after"])
        if kind in VALID_KINDS:
            record.lost = not (status == 200 and complete) and not shed
        return record

    def chat(self, client: httpx.Client, i: int, kind: str = "chat") -> Record:
        start = time.monotonic()
        try:
            res = client.post(f"{self.base}/v1/chat/completions", json=self._body(i), headers=self._headers())
        except httpx.HTTPError as exc:
            return self._record(kind, start, None, f"error: {type(exc).__name__}", complete=False)
        complete = res.status_code == 200 and res.json()["choices"][0]["finish_reason"] in ("stop", "length")
        return self._record(kind, start, res, complete=complete)

    def stream(self, client: httpx.Client, i: int, cut_after: int | None = None) -> Record:
        """A streamed chat read to its end, or (``cut_after``) closed after that many chunks."""
        kind = "stream" if cut_after is None else "cut_stream"
        start = time.monotonic()
        try:
            with client.stream("POST", f"{self.base}/v1/chat/completions", json=self._body(i, True),
                               headers=self._headers()) as res:
                if res.status_code != 200:
                    res.read()
                    return self._record(kind, start, res)
                finish, done, n = None, False, 0
                for line in res.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    n += 1
                    if cut_after is not None and n >= cut_after:
                        return self._record(kind, start, res, "cut")
                    if line == "data: [DONE]":
                        done = True
                    elif (chunk := json.loads(line[6:])).get("choices"):
                        finish = chunk["choices"][0]["finish_reason"] or finish
                return self._record(kind, start, res, complete=done and finish in ("stop", "length"))
        except httpx.HTTPError as exc:
            return self._record(kind, start, None, f"error: {type(exc).__name__}", complete=False)

    def hostile(self, client: httpx.Client, kind: str) -> Record:
        """One request the server must refuse with a 4xx."""
        chat = json.dumps(self._body(0)).encode()
        url, content, headers = f"{self.base}/v1/chat/completions", chat, self._headers()
        if kind == "malformed_json":
            content = chat[: len(chat) // 2]
        elif kind == "oversized_body":
            content = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
        elif kind == "deep_body":
            content = b"[" * 100_000 + b"]" * 100_000
        elif kind == "wrong_key":
            headers = {"Authorization": "Bearer not-the-key"}
        elif kind == "wrong_host":
            headers = self._headers(Host="rebound.example.com", **{"Content-Type": "text/plain"})
        start = time.monotonic()
        try:
            res = client.post(url, content=content, headers={"Content-Type": "application/json", **headers})
        except httpx.HTTPError as exc:
            return self._record(kind, start, None, f"error: {type(exc).__name__}")
        return self._record(kind, start, res)

    def half_head(self) -> Record:
        """A connection that sends part of a request head and waits: the server must close it."""
        start = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=HALF_HEAD_GUARD_S) as sock:
                sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthoriz")
                while sock.recv(65536):
                    pass
            outcome = "closed"
        except TimeoutError:
            outcome = "left-open"
        except OSError as exc:
            outcome = f"error: {type(exc).__name__}"
        return Record("half_head", outcome, start - self.t0, time.monotonic() - start)


class Soak:
    """The run: its records (thread-safe) and the server's RSS samples."""

    def __init__(self, traffic: Traffic, args: argparse.Namespace, pid: int) -> None:
        self.traffic, self.args = traffic, args
        self.server = psutil.Process(pid)
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.end = traffic.t0 + args.minutes * 60
        self.rss: dict[str, int] = {}

    def add(self, record: Record) -> None:
        with self.lock:
            self.records.append(record)

    def worker(self, n: int) -> None:
        rng = random.Random(self.args.seed + n)
        kinds, weights = list(WEIGHTS), list(WEIGHTS.values())
        with httpx.Client(timeout=300) as client:
            while time.monotonic() < self.end:
                kind, i = rng.choices(kinds, weights)[0], rng.randrange(1000)
                if kind == "chat":
                    record = self.traffic.chat(client, i)
                elif kind in ("stream", "cut_stream"):
                    record = self.traffic.stream(client, i, cut_after=2 if kind == "cut_stream" else None)
                else:
                    record = self.traffic.hostile(client, kind)
                self.add(record)
                time.sleep(record.retry_after_s)  # as a polite client does after a 429/503

    def floods(self) -> None:
        size = self.args.parallel + self.args.queue + 4
        while not self._sleep_until_next(FLOOD_EVERY_S):
            with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=size)) as client, \
                    ThreadPoolExecutor(size) as pool:
                for record in pool.map(lambda i: self.traffic.chat(client, i, kind="flood"), range(size)):
                    self.add(record)

    def half_heads(self) -> None:
        while not self._sleep_until_next(HALF_HEADS_EVERY_S):
            with ThreadPoolExecutor(HALF_HEADS_AT_ONCE) as pool:
                for record in pool.map(lambda _: self.traffic.half_head(), range(HALF_HEADS_AT_ONCE)):
                    self.add(record)

    def _sleep_until_next(self, every_s: float) -> bool:
        """Wait ``every_s``; True when the run is over by then."""
        time.sleep(max(0.0, min(every_s, self.end - time.monotonic())))
        return time.monotonic() >= self.end

    def sample_rss(self, label: str) -> None:
        self.rss[label] = self.server.memory_info().rss

    def run(self) -> None:
        self.sample_rss("start")
        threads = [threading.Thread(target=self.worker, args=(n,), daemon=True) for n in range(self.args.clients)]
        threads += [threading.Thread(target=self.floods, daemon=True),
                    threading.Thread(target=self.half_heads, daemon=True)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, self.traffic.t0 + self.args.warmup - time.monotonic()))
        self.sample_rss("after warm-up")
        for t in threads:
            t.join()
        self.sample_rss("end")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(soak: Soak) -> None:
    records = soak.records
    by_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        by_kind[r.kind][r.outcome] += 1
    outcomes = sorted({o for c in by_kind.values() for o in c}, key=lambda o: (not o.isdigit(), o))
    width = max(7, *(len(o) for o in outcomes))
    print("\nrequests by kind × outcome")
    print(f"  {'kind':<15}" + "".join(f"{o:>{width + 1}}" for o in outcomes) + f"{'total':>8}")
    for kind in [*VALID_KINDS, "cut_stream", *(k for k in WEIGHTS if k not in (*VALID_KINDS, "cut_stream")),
                 "half_head"]:
        row = by_kind.get(kind)
        if row:
            cells = "".join(f"{row.get(o, 0) or '·':>{width + 1}}" for o in outcomes)
            print(f"  {kind:<15}{cells}{sum(row.values()):>8}")

    print("\nvalid requests answered 200, latency by minute (request sent → last byte)")
    print(f"  {'minute':>6} {'n':>6} {'p50 s':>8} {'p95 s':>8}")
    per_minute: dict[int, list[float]] = defaultdict(list)
    for r in records:
        if r.valid and r.outcome == "200" and not r.lost:
            per_minute[int(r.started // 60)].append(r.latency_s)
    for minute in sorted(per_minute):
        lat = per_minute[minute]
        print(f"  {minute + 1:>6} {len(lat):>6} {pct(lat, 0.5):>8.2f} {pct(lat, 0.95):>8.2f}")

    rss = soak.rss
    print("\nserver RSS: " + ", ".join(f"{label} {value / MIB:.1f} MiB" for label, value in rss.items()))
    growth = (rss["end"] - rss["after warm-up"]) / rss["after warm-up"] * 100
    bad = [r for r in records if r.bad_5xx]
    valid = [r for r in records if r.valid]
    lost = [r for r in valid if r.lost]
    heads = [r for r in records if r.kind == "half_head"]
    open_heads = [r for r in heads if r.outcome != "closed"]
    print("\ntargets")
    print(f"  no 5xx other than 503 with Retry-After: {len(bad)} of {len(records)} requests "
          f"({verdict(not bad)})")
    print(f"  0 lost valid requests: {len(lost)} lost of {len(valid)} "
          f"({sum(r.outcome in ('429', '503') for r in valid)} shed with 429/503) ({verdict(not lost)})")
    for r in lost[:5]:
        print(f"    lost: {r.kind} at {r.started:.1f} s: {r.outcome}")
    print(f"  half-sent heads disconnected: {len(heads) - len(open_heads)} of {len(heads)} "
          f"(median {statistics.median([r.latency_s for r in heads]) if heads else 0:.1f} s) "
          f"({verdict(not open_heads)})")
    print(f"  RSS growth after warm-up < 5%: {growth:+.2f}% ({verdict(growth < 5)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clients", type=int, default=4, help="Workers sending the random mix.")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--warmup", type=float, default=None, help="Seconds before the warm RSS sample.")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = min(60.0, args.minutes * 60 / 5)
    port = free_port()
    base = f"http://{LOOPBACK}:{port}"
    argv = [sys.executable, "-m", "edge_runtime.cli", "serve", "--model", args.model, "--port", str(port),
            "--parallel", str(args.parallel), "--queue", str(args.queue), "--ctx", str(args.ctx),
            "--api-key", KEY, *(["--threads", str(args.threads)] if args.threads else [])]
    print(f"server_soak: {args.minutes:g} min, {args.clients} clients + floods of "
          f"{args.parallel + args.queue + 4} every {FLOOD_EVERY_S:g} s + {HALF_HEADS_AT_ONCE} half heads every "
          f"{HALF_HEADS_EVERY_S:g} s; edgert serve --parallel {args.parallel} --queue {args.queue} --ctx {args.ctx}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with running_server(argv, f"{base}/health") as process:
        soak = Soak(Traffic(base, KEY, args.max_tokens, time.monotonic()), args, process.pid)
        soak.run()
    report(soak)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
