#!/usr/bin/env python3
"""The ONNX and TFLite backends against their runtime's own bare decode loop, on the same artifact.

For each backend the same model file (the embedded SmolLM2 as ONNX int8 and TFLite int8, as
``benchmarks/backends.py`` builds them into ``build/bench-backends/``) is decoded greedily twice per
round, each run in a fresh child process so neither pays for the other's threads or caches:

- edgert: ``load_backend(name).load(...)`` and ``Model.generate`` with greedy ``SamplingParams``,
  the path users get (the shared numpy sampler, the streaming detokenizer, stop checks);
- bare: the runtime alone. ONNX: onnxruntime-genai's own ``Generator`` loop (greedy search in C++,
  ``generate_next_token`` per token). TFLite: LiteRT's ``CompiledModel`` running the decode
  signature in a tight loop, the KV cache double-buffered as edgert does it, ``np.argmax`` on the
  logits.

Both runs use the same threads, prompt and token count, and time only the tokens after the first
(decode). Rounds alternate which runner goes first. It prints each runner's median tok/s and the
ratio edgert ÷ bare per backend (target: ≥ 0.95, as edgert's llama.cpp path against llama-bench in
``decode.py``). The script reports; it never fails on a miss.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The history of the printing press begins"


def measure_edgert(backend: str, path: str, threads: int, tokens: int) -> float:
    """Decode tok/s through edgert's backend, greedy."""
    from edge_runtime.backends import load_backend
    from edge_runtime.backends.base import SamplingParams, Settings

    with load_backend(backend).load(path, Settings(n_ctx=512, n_threads=threads)) as model:
        prompt = model.tokenize(PROMPT, add_bos=model.info.add_bos)
        params = SamplingParams(temperature=0, max_tokens=tokens, stop=())
        last = None
        for event in model.generate(prompt, params):
            last = event
        stats = last.stats
        if stats.gen_tokens < tokens:
            raise SystemExit(f"edgert stopped after {stats.gen_tokens} tokens ({last.finish_reason})")
        return stats.decode_tok_s


def measure_bare_onnx(path: str, threads: int, tokens: int) -> float:
    """Decode tok/s of onnxruntime-genai's own greedy Generator loop."""
    import onnxruntime_genai as og

    config = og.Config(path)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    config.clear_providers()
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=512, do_sample=False, batch_size=1)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    generator.generate_next_token()  # the first token comes out of the prefill
    started = time.perf_counter()
    for _ in range(tokens - 1):
        generator.generate_next_token()
    return (tokens - 1) / (time.perf_counter() - started)


def measure_bare_tflite(path: str, threads: int, tokens: int) -> float:
    """Decode tok/s of LiteRT's decode signature in a tight greedy loop (prompt fed token by token)."""
    import numpy as np
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.cpu_options import CpuOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import Options
    from tokenizers import Tokenizer

    from edge_runtime.formats.tflite import DECODE, INPUT_POS, LOGITS, TOKENS, read_tflite_layout

    layout = read_tflite_layout(path)
    cache = Path(path).with_suffix(".bare.xnnpack")  # the bare loop's own packed-weight cache
    cpu = CpuOptions(num_threads=threads, xnnpack_weight_cache_path=str(cache))
    model = CompiledModel.from_file(path, options=Options(hardware_accelerators=HardwareAccelerator.CPU,
                                                          cpu_options=cpu))
    kv_inputs = {n: i for n, i in layout.signatures[DECODE].inputs.items() if n.startswith("kv_cache_")}

    def kv_set() -> dict:
        buffers = {}
        for name, info in kv_inputs.items():
            buf = model.create_input_buffer_by_name(DECODE, name)
            buf.write(np.zeros(info.shape, dtype=np.float16 if info.dtype == "float16" else np.float32))
            buffers[name] = buf
        return buffers

    current, spare = kv_set(), kv_set()
    tok_buf = model.create_input_buffer_by_name(DECODE, TOKENS)
    pos_buf = model.create_input_buffer_by_name(DECODE, INPUT_POS)
    logit_buf = model.create_output_buffer_by_name(DECODE, LOGITS)
    n_vocab = layout.n_vocab

    def step(token: int, pos: int) -> int:
        nonlocal current, spare
        tok_buf.write(np.array([[token]], dtype=np.int32))
        pos_buf.write(np.array([pos], dtype=np.int32))
        model.run_by_name(DECODE, {TOKENS: tok_buf, INPUT_POS: pos_buf, **current}, {LOGITS: logit_buf, **spare})
        current, spare = spare, current
        return int(np.argmax(logit_buf.read(n_vocab, np.float32)))

    tokenizer = Tokenizer.from_file(str(Path(path).parent / "tokenizer.json"))
    prompt = tokenizer.encode(PROMPT).ids
    for pos, token in enumerate(prompt):
        nxt = step(token, pos)
    pos = len(prompt)
    started = time.perf_counter()
    for _ in range(tokens - 1):
        nxt = step(nxt, pos)
        pos += 1
    return (tokens - 1) / (time.perf_counter() - started)


def run_child(runner: str, backend: str, path: str, threads: int, tokens: int) -> float:
    cmd = [sys.executable, __file__, "--child", runner, backend, path, str(threads), str(tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{runner} {backend} failed (exit {res.returncode}):\n{res.stderr.strip()[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def artifacts(out: Path) -> dict[str, str]:
    """{backend: path} of the int8 TFLite and ONNX artifacts in ``out``'s manifest."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return {}
    found = {}
    for art in json.loads(manifest.read_text())["artifacts"]:
        if art.get("quant") == "int8" and art.get("format") in ("onnx", "tflite"):
            found[art["format"]] = str(out / art["file"])
    return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        runner, backend, path, threads, tokens = sys.argv[2:7]
        if runner == "edgert":
            print(measure_edgert(backend, path, int(threads), int(tokens)))
        elif backend == "onnx":
            print(measure_bare_onnx(path, int(threads), int(tokens)))
        else:
            print(measure_bare_tflite(path, int(threads), int(tokens)))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench-backends",
                        help="the folder benchmarks/backends.py builds (its int8 artifacts are used)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    found = artifacts(args.out)
    if set(found) != {"onnx", "tflite"}:
        raise SystemExit(f"no int8 ONNX/TFLite artifacts in {args.out}: run benchmarks/backends.py first "
                         "(it converts the embedded model into that folder)")
    print(f"threads {args.threads} · {args.tokens} tokens · {args.rounds} rounds · "
          f"load average {os.getloadavg()[0]:.2f}")
    speeds: dict[tuple[str, str], list[float]] = {}
    for i in range(args.rounds):
        for backend, path in sorted(found.items()):
            order = ("edgert", "bare") if i % 2 == 0 else ("bare", "edgert")
            for runner in order:
                speed = run_child(runner, backend, path, args.threads, args.tokens)
                speeds.setdefault((backend, runner), []).append(speed)
                print(f"  round {i + 1} {backend:6} {runner:6} {speed:7.1f} tok/s", flush=True)
    print(f"\n{'backend':8}{'edgert tok/s':>14}{'bare tok/s':>12}{'edgert ÷ bare':>15}   (medians; per-round ratios)")
    for backend in sorted(found):
        ours, bare = speeds[(backend, "edgert")], speeds[(backend, "bare")]
        ratios = [a / b for a, b in zip(ours, bare, strict=True)]
        print(f"{backend:8}{statistics.median(ours):14.1f}{statistics.median(bare):12.1f}"
              f"{statistics.median(ours) / statistics.median(bare):15.3f}   "
              + " ".join(f"{r:.3f}" for r in ratios))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
