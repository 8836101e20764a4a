#!/usr/bin/env python3
"""Decode speed with and without a JSON-schema constraint, and how often the answers are valid JSON.

Per backend, on one model loaded once: llama.cpp on the embedded SmolLM2, and the ONNX int8 and
TFLite int8 conversions of SmolLM2 that ``benchmarks/backends.py`` builds into
``build/bench-backends`` (absent: the backend is skipped with the reason, unless ``--build``
asks to build them with that script's convert step). The same chat prompt is answered with and
without the schema in interleaved rounds (the order alternates, each round has its own seed), so
a noisy machine slows both alike. Printed per backend: median decode tok/s of each, the median of
the paired ratios constrained ÷ unconstrained (target ≥ 0.9), the share of answers that stop
within ``--max-tokens``, and the share of those that parse and validate against the schema
(constrained: 100 %). It reports; it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import jsonschema

from edge_runtime.backends import load_backend
from edge_runtime.backends.base import SamplingParams, Settings

REPO = Path(__file__).resolve().parent.parent
QUESTION = "Describe a person as JSON: name, age, hobbies, address (city, country) and role."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
                    "required": ["city", "country"], "additionalProperties": False},
        "role": {"enum": ["student", "teacher", "engineer"]},
    },
    "required": ["name", "age", "hobbies", "address", "role"],
    "additionalProperties": False,
}
BUILT = (("onnx", "int8"), ("tflite", "int8"))


def artifacts(args: argparse.Namespace) -> list[tuple[str, Path | None, str]]:
    """(backend, artifact or None, why it is missing) for every backend measured."""
    from edge_runtime.models.spec import resolve_model

    found: list[tuple[str, Path | None, str]] = [("llama.cpp", resolve_model("smollm2"), "")]
    manifest_path = args.out / "manifest.json"
    if args.build:
        from backends import convert

        convert(argparse.Namespace(model="smollm2", out=args.out, threads=args.threads, eval_ctx=512, chunks=8,
                                   text_chars=200_000))
    by_key = {}
    if manifest_path.is_file():
        by_key = {(a["format"], a["quant"]): a for a in json.loads(manifest_path.read_text())["artifacts"]}
    for fmt, quant in BUILT:
        entry = by_key.get((fmt, quant))
        path = args.out / entry["file"] if entry else None
        if path is None or not path.exists():
            found.append((fmt, None, f"no {fmt} {quant} in {args.out} (build it with --build or "
                                     "benchmarks/backends.py)"))
        else:
            found.append((fmt, path, ""))
    return found


def answer(model, prompt: list[int], params: SamplingParams) -> tuple[float, bool, bool]:
    """(decode tok/s, stopped by itself, valid against the schema)."""
    events = list(model.generate(prompt, params))
    text, last = "".join(e.text for e in events), events[-1]
    stopped = last.finish_reason == "stop"
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        valid = True
    except (json.JSONDecodeError, jsonschema.ValidationError):
        valid = False
    return last.stats.decode_tok_s, stopped, valid


def measure(backend: str, path: Path, args: argparse.Namespace) -> dict:
    runs: dict[str, list[tuple[float, bool, bool]]] = {"free": [], "schema": []}
    with load_backend(backend).load(str(path), Settings(n_ctx=1024, n_threads=args.threads)) as model:
        prompt = model.tokenize(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n", special=True)
        for r in range(args.rounds + 1):  # round 0 warms up (and builds the grammar tokenizer)
            order = ("free", "schema") if r % 2 else ("schema", "free")
            for mode in order:
                params = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=r,
                                        json_schema=SCHEMA if mode == "schema" else None)
                got = answer(model, prompt, params)
                if r:
                    runs[mode].append(got)
                print(f"  round {r} {mode:<6} {got[0]:6.1f} tok/s stopped={got[1]} valid={got[2]}", flush=True)
    return runs


def share(hits: int, total: int) -> str:
    return f"{hits}/{total}" + (f" ({100 * hits / total:.0f} %)" if total else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-backends")
    parser.add_argument("--build", action="store_true", help="build the ONNX/TFLite artifacts if missing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows = []
    for backend, path, why in artifacts(args):
        if path is None:
            print(f"{backend}: skipped, {why}")
            continue
        print(f"{backend}: {path.name}, {args.rounds} interleaved rounds ...", flush=True)
        runs = measure(backend, path, args)
        free, schema = runs["free"], runs["schema"]
        ratios = [s[0] / f[0] for f, s in zip(free, schema, strict=True) if f[0] > 0]
        rows.append((backend, statistics.median(f[0] for f in free), statistics.median(s[0] for s in schema),
                     statistics.median(ratios) if ratios else float("nan"),
                     [share(sum(s[1] for s in x), len(x)) for x in (free, schema)],
                     [share(sum(s[2] for s in x if s[1]), sum(s[1] for s in x)) for x in (free, schema)]))
    print(f"\n{args.threads} threads · max_tokens {args.max_tokens} · temperature 0.7 · "
          f"load {load_before:.2f} → {os.getloadavg()[0]:.2f}")
    head = ("backend", "free tok/s", "schema tok/s", "ratio (target ≥ 0.9)", "stopped free", "stopped schema",
            "valid free", "valid schema")
    table = [head] + [(b, f"{f:.1f}", f"{s:.1f}", f"{r:.3f}", *stop, *valid) for b, f, s, r, stop, valid in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # backends.py's convert step, for --build
    main()
