#!/usr/bin/env python3
"""`edgert bench` against llama.cpp's own `llama-bench`: prompt processing and decode, side by side.

Both measure the same GGUF file with the same threads, batch sizes, flash attention (on), KV cache
type and repetitions:

- prompt processing (pp): a 512-token prompt from an empty cache. llama-bench: ``-p 512 -n 0``.
  edgert: ``prefill_tok_s`` at ``--prompt-tokens 512`` (one generated token; the time to it is
  prefill plus one sampling step).
- decode (tg): 128 tokens. llama-bench's ``-n 128`` decodes random tokens after the cache holds
  ``-d`` tokens; edgert decodes greedily through ``Model.generate`` after a 16-token prompt, so
  llama-bench runs with ``-d 16`` and both decode at the same depth. edgert counts the tokens after
  the first over the time after the first, and pays for sampling, detokenizing and streaming
  each token as users do; llama-bench times bare ``llama_decode`` calls.

Runs alternate (llama-bench pp, llama-bench tg, edgert bench) for ``--rounds`` rounds; the table
shows the median of the rounds' means and the ratio edgert / llama-bench. Target: tg ratio
>= 0.97. Where ./bin/llama-bench-shared exists (the same tool linked to the llama.cpp libraries
llama-cpp-python installed, the kernels edgert runs), it runs in each round too, so the cost of
that shared build is told apart from edgert's own per-token cost. Then the figures only edgert
bench gives. The script reports; it never fails on a missed target. llama-bench comes from PATH
or ./bin/llama-bench (``scripts/build_llama_tools.sh`` builds both from the llama.cpp that
llama-cpp-python vendors).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from executables import find_edgert, find_llama_tool

from edge_runtime.backends.base import default_threads

DECODE_DEPTH = 16  # edgert's decode prompt; llama-bench's -d


def run_edgert(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """One ``edgert bench --json FILE`` run; the result's only entry."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        command = [find_edgert(args.edgert), "bench", model, "--threads", str(args.threads),
                   "--prompt-tokens", f"{DECODE_DEPTH},{args.pp}", "--gen-tokens", str(args.tg),
                   "--reps", str(args.reps), "--warmup", "1", "--json", str(out)]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"edgert bench exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["results"][0]


def run_llama_bench(binary: str, model: str, settings: dict[str, Any], args: argparse.Namespace,
                    pp: int, tg: int, depth: int) -> tuple[float, float]:
    """(mean tok/s, stddev) of one llama-bench test with edgert's settings."""
    command = [binary, "-m", model, "-t", str(args.threads), "-p", str(pp), "-n", str(tg), "-d", str(depth),
               "-b", str(settings["n_batch"]), "-ub", str(settings["n_ubatch"]),
               "-fa", "on" if settings.get("flash_attn", True) else "off",
               "-ctk", settings.get("type_k", "f16"), "-ctv", settings.get("type_v", "f16"),
               "-ngl", str(settings.get("n_gpu_layers", 0)), "-r", str(args.reps), "-o", "json"]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    tests = json.loads(proc.stdout)
    if not tests:
        raise RuntimeError(f"llama-bench printed no result:\n{proc.stdout[-2000:]}")
    return float(tests[0]["avg_ts"]), float(tests[0]["stddev_ts"])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="GGUF file or model name (default: smollm2)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions inside each tool (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of both tools (default 3)")
    parser.add_argument("--pp", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--tg", type=int, default=128, help="generated tokens (default 128)")
    parser.add_argument("--llama-bench", dest="llama_bench", default=None, help="llama-bench binary")
    parser.add_argument("--edgert", default=None, help="edgert executable (default: the venv's)")
    args = parser.parse_args()

    from edge_runtime.models.spec import resolve_model

    model = str(resolve_model(args.model))
    binary = find_llama_tool("llama-bench", args.llama_bench)
    # The shared twin only beside the static tool it was built with (./bin), never with another llama-bench.
    shared = find_llama_tool("llama-bench-shared") if binary else None
    if shared and Path(shared).resolve().parent != Path(binary).resolve().parent:
        shared = None
    tools = {name: path for name, path in (("llama-bench", binary), ("llama-bench-shared", shared)) if path}
    load_before = os.getloadavg()[0]
    native: dict[str, dict[str, list[float]]] = {name: {"pp": [], "tg": []} for name in tools}
    ours: list[dict[str, Any]] = []
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds}: edgert bench", file=sys.stderr)
        ours.append(run_edgert(model, args))
        settings = ours[0]["settings"]
        for name, path in tools.items():
            print(f"round {i + 1}/{args.rounds}: {name} pp{args.pp}, tg{args.tg} @ depth {DECODE_DEPTH}",
                  file=sys.stderr)
            native[name]["pp"].append(run_llama_bench(path, model, settings, args, args.pp, 0, 0)[0])
            native[name]["tg"].append(run_llama_bench(path, model, settings, args, 0, args.tg, DECODE_DEPTH)[0])
    load_after = os.getloadavg()[0]

    settings = ours[0]["settings"]
    print(f"edgert bench vs llama-bench · {Path(model).name} · {args.threads} threads · batch "
          f"{settings['n_batch']}/{settings['n_ubatch']} · flash attention on · KV {settings['type_k']} · "
          f"{args.reps} reps × {args.rounds} rounds (medians of round means)")
    print(f"load average {load_before:.2f} before, {load_after:.2f} after")
    print()
    our_pp = [r["prefill_tok_s"] for r in ours]
    our_tg = [r["decode_tok_s"] for r in ours]
    print(f"{'test':<16}{'tool':<20}{'tool tok/s':>11}{'edgert tok/s':>14}{'edgert/tool':>13}"
          "   rounds (edgert | tool)")
    for key, test, mine in (("pp", f"pp{args.pp}", our_pp), ("tg", f"tg{args.tg} @ d{DECODE_DEPTH}", our_tg)):
        for name, figures in native.items():
            theirs = figures[key]
            print(f"{test:<16}{name:<20}{median(theirs):>11.1f}{median(mine):>14.1f}"
                  f"{median(mine) / median(theirs):>13.3f}   "
                  f"{' '.join(f'{x:.1f}' for x in mine)} | {' '.join(f'{x:.1f}' for x in theirs)}")
    print()
    if binary:
        native_tg = native["llama-bench"]["tg"]
        ratio = median(our_tg) / median(native_tg)
        verdict = "meets target" if ratio >= 0.97 else "BELOW target"
        print(f"tg: edgert / llama-bench = {ratio:.3f} (target >= 0.97: {verdict}); "
              f"per-token overhead {1000 / median(our_tg) - 1000 / median(native_tg):+.3f} ms")
        print(f"pp: edgert / llama-bench = {median(our_pp) / median(native['llama-bench']['pp']):.3f}")
        if shared:
            build = median(native["llama-bench-shared"]["tg"]) / median(native_tg)
            own = median(our_tg) / median(native["llama-bench-shared"]["tg"])
            print(f"tg split: llama-bench on the venv's shared libraries / static = {build:.3f} (the build); "
                  f"edgert / that = {own:.3f} (edgert's own loop)")
        print("tools: " + ", ".join(tools.values()))
    else:
        print("llama-bench: not found on PATH or in ./bin (build it with scripts/build_llama_tools.sh)")
    last = ours[-1]
    roof = last.get("roofline") or {}
    energy = last.get("energy") or {}
    temp = last.get("temperature_c") or {}
    print()
    print("only edgert bench reports (last round):")
    print("  TTFT ms        " + ", ".join(f"{n} tokens {ms:.1f}" for n, ms in last["ttft_ms"].items()))
    print(f"  load           {last['load_s']:.2f} s · peak RSS {last['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(plan estimate {(last.get('estimated_memory_bytes') or 0) / 2**20:.0f} MiB)")
    if roof:
        print(f"  roofline       {roof['bandwidth_bytes_s'] / 1e9:.1f} GB/s ÷ "
              f"{roof['bytes_per_token'] / 2**20:.1f} MiB per token = {roof['ceiling_tok_s']:.0f} tok/s ceiling · "
              f"efficiency {roof['efficiency']:.0%}")
    print(f"  energy         {energy.get('decode_j_per_token') if energy.get('available') else energy.get('note')}")
    print(f"  CPU °C         {temp.get('before')} → {temp.get('after')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
