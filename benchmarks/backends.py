#!/usr/bin/env python3
"""The three backends side by side: one model as GGUF Q8_0, TFLite int8 and ONNX int8.

1. ``edgert convert MODEL --format gguf,tflite,onnx --outtype f32 --quant Q8_0,int8 --text T``
   (reused from ``--out`` when it is already there): every artifact with its quality measured
   against the GGUF F32 reference on the same token ids (perplexity, mean KL divergence, top-1).
2. ``edgert bench`` on the three quantized artifacts in one run (each in its own child process,
   the same threads, prompt lengths and token counts): decode and prefill tokens/s (mean ± sd),
   TTFT per prompt length, load time, peak RSS.

It prints one table and the ratios to the GGUF row. There is no target: the table is what a user
needs to choose a backend, and what the profiles' backend orders must be justified by. The script
reports and always exits 0 on measurements; run it on a quiet machine (it prints the load).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from prose import prose_file

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
WANTED = (("gguf", "Q8_0"), ("tflite", "int8"), ("onnx", "int8"))


def edgert(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edge_runtime.cli", *args]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:])} failed (exit {res.returncode}):\n{res.stderr.strip()}")
    return res


def convert(args: argparse.Namespace) -> dict:
    """The manifest of the three-format build (built once, then reused by `edgert convert`)."""
    text = prose_file(args.text_chars)
    res = edgert("convert", args.model, "--format", "gguf,tflite,onnx", "--outtype", "f32", "--quant", "Q8_0,int8",
                 "--text", str(text), "--ctx", str(args.eval_ctx), "--chunks", str(args.chunks),
                 "--threads", str(args.threads), "--out", str(args.out), "--no-store", "--json")
    doc = json.loads(res.stdout)
    print(f"convert: built {len(doc['built'])}, reused {len(doc['reused'])} · {args.out}")
    for warning in doc.get("warnings", []):
        print(f"  warning: {warning}")
    return doc


def bench(args: argparse.Namespace, paths: list[str]) -> dict:
    result = Path(tempfile.mkdtemp()) / "bench.json"
    edgert("bench", *paths, "--threads", str(args.threads), "--prompt-tokens", args.prompt_tokens,
           "--gen-tokens", str(args.gen_tokens), "--reps", str(args.reps), "--json", str(result))
    return json.loads(result.read_text())


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="source: a model name, .gguf or HF folder")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-backends")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", default="32,128")
    parser.add_argument("--gen-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--eval-ctx", type=int, default=512, help="perplexity/KLD window")
    parser.add_argument("--chunks", type=int, default=8, help="windows scored")
    parser.add_argument("--text-chars", type=int, default=200_000)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    manifest = convert(args)
    by_key = {(a["format"], a["quant"]): a for a in manifest["artifacts"]}
    missing = [f"{f} {q}" for f, q in WANTED if (f, q) not in by_key]
    if missing:
        sys.exit(f"the build has no {', '.join(missing)}")
    chosen = [by_key[k] for k in WANTED]
    doc = bench(args, [str(args.out / a["file"]) for a in chosen])
    runs = {Path(r["artifact"]["path"]).name: r for r in doc["results"]}
    lengths = [p.strip() for p in args.prompt_tokens.split(",")]
    ev = manifest.get("evaluation") or {}

    print(f"\nmodel {manifest['model']} · {args.threads} threads · {args.gen_tokens} tokens decoded · "
          f"{args.reps} reps · load {load_before:.2f} → {os.getloadavg()[0]:.2f}")
    print(f"quality vs {ev.get('method', '?').split(' vs ')[-1]} on {ev.get('n_chunks')} windows of "
          f"{ev.get('n_ctx')} tokens of the Python documentation (perplexity of the reference: "
          f"{fmt(by_key.get(('gguf', 'F32'), {}).get('quality', {}).get('ppl'), '.3f')})\n")
    head = ["backend", "artifact", "MiB", "decode tok/s", "prefill tok/s",
            *[f"TTFT@{n} ms" for n in lengths], "load s", "peak RSS MiB", "ppl", "KLD", "top-1"]
    rows = [head]
    base = runs.get(Path(chosen[0]["file"]).name)
    for a in chosen:
        r, q = runs.get(Path(a["file"]).name), a.get("quality") or {}
        if r is None:
            rows.append([a["format"], a["file"], "not measured"])
            continue
        rows.append([
            r["backend"], f"{a['format']} {a['quant']}", f"{a['size_bytes'] / MIB:.0f}",
            f"{r['decode_tok_s']:.1f} ± {r['decode_tok_s_sd']:.1f}",
            f"{r['prefill_tok_s']:.0f} ± {r['prefill_tok_s_sd']:.0f}",
            *[fmt(r["ttft_ms"].get(n), ".0f") for n in lengths],
            f"{r['load_s']:.2f}", fmt(r["peak_rss_bytes"] and r["peak_rss_bytes"] / MIB, ".0f"),
            fmt(q.get("ppl"), ".3f"), fmt(q.get("kld_mean"), ".5f"),
            fmt(q.get("top1_agreement") and 100 * q["top1_agreement"], ".1f"),
        ])
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())
    if base:
        print("\nratio to llama.cpp Q8_0 (same run):")
        for a in chosen[1:]:
            r = runs.get(Path(a["file"]).name)
            if r:
                print(f"  {r['backend']:<8} decode {r['decode_tok_s'] / base['decode_tok_s']:.2f}× · "
                      f"prefill {r['prefill_tok_s'] / base['prefill_tok_s']:.2f}× · "
                      f"peak RSS {r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}×")


if __name__ == "__main__":
    main()
