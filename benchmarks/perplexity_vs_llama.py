#!/usr/bin/env python3
"""Our perplexity against llama.cpp's own ``llama-perplexity``, same model, text, windows, threads.

For each configuration it runs ``llama-perplexity -m MODEL -f TEXT -c N_CTX -b N_BATCH --chunks K``
(built from the very llama.cpp the installed llama-cpp-python carries, by
``scripts/build_llama_tools.sh``) and ``edge_runtime.converters.evaluate.evaluate`` on the same
file, then prints both final estimates (llama-perplexity prints 4 decimals), the ratio, the time
each took, and llama-perplexity's running value after each window. Configurations:

- ``-c 128 -b 128``: one window per decode, exactly our shape;
- ``-c 128`` with llama-perplexity's default batch (2048: 16 windows decoded side by side in one
  batch); flash attention and ubatch sizes change float rounding, so this may differ in the last
  digits;
- ``-c 512`` (llama-perplexity's default context) with its default batch (4 windows per batch).

Target: equal to ~4 decimal places (ratio 1.0000). The script reports; it never fails on a miss.
Text: ``--text FILE``, else the Python documentation every installation carries
(``pydoc_data.topics``); tokenized whole, as llama-perplexity does.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from executables import find_llama_tool
from prose import prose_file

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ((128, 128), (128, None), (512, None))  # (n_ctx, n_batch for llama-perplexity; None = default)


def run_llama(tool: str, model: str, text: Path, n_ctx: int, n_batch: int | None, chunks: int,
              threads: int) -> tuple[float, list[float], float]:
    """(final ppl, running values per window, seconds) from llama-perplexity's output."""
    cmd = [tool, "-m", model, "-f", str(text), "-c", str(n_ctx), "--chunks", str(chunks), "-t", str(threads)]
    if n_batch is not None:
        cmd += ["-b", str(n_batch)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    out = proc.stdout + proc.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", out)
    if proc.returncode != 0 or final is None:
        tail = "\n".join(out.strip().splitlines()[-5:])
        raise RuntimeError(f"llama-perplexity failed (exit {proc.returncode}):\n{tail}")
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", out)]
    return float(final.group(1)), running, seconds


def run_ours(model: str, text: Path, n_ctx: int, chunks: int, threads: int) -> tuple[float, float]:
    """(final ppl, seconds) from our evaluator."""
    from edge_runtime.converters import evaluate as ev

    started = time.perf_counter()
    report = ev.evaluate(model, text=text, n_ctx=n_ctx, n_chunks=chunks, threads=threads)
    return float(report.ppl), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a .gguf file or a model name (default: smollm2)")
    parser.add_argument("--text", type=Path, default=None, help="default: the Python documentation")
    parser.add_argument("--chunks", type=int, default=8, help="windows per configuration")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    args.text = args.text or prose_file()

    from edge_runtime.models.spec import resolve_model

    model = str(resolve_model(args.model))
    tool = find_llama_tool("llama-perplexity")
    print(f"model {Path(model).name} · text {args.text.name} · {args.chunks} windows · "
          f"{args.threads} threads · load average {os.getloadavg()[0]:.2f}")
    if tool is None:
        print("llama-perplexity not found: run scripts/build_llama_tools.sh (or put it on PATH)")
        sys.exit(0)
    header = f"{'config':<22} {'llama-perplexity':>17} {'edge-runtime':>14} {'ratio':>8}  {'time llama / ours':>18}"
    print(header)
    print("-" * len(header))
    for n_ctx, n_batch in CONFIGS:
        label = f"-c {n_ctx} " + (f"-b {n_batch}" if n_batch else "(default -b)")
        try:
            theirs, their_running, their_s = run_llama(tool, model, args.text, n_ctx, n_batch, args.chunks,
                                                       args.threads)
        except RuntimeError as exc:
            print(f"{label:<22} {exc}")
            continue
        ours, our_s = run_ours(model, args.text, n_ctx, args.chunks, args.threads)
        print(f"{label:<22} {theirs:>17.4f} {ours:>14.4f} {ours / theirs:>8.5f}  {their_s:>8.1f} s / {our_s:.1f} s")
        print(f"{'':<22} llama-perplexity per window (running): "
              + ", ".join(f"{v:.4f}" for v in their_running))


if __name__ == "__main__":
    main()
