#!/usr/bin/env python3
"""HF → GGUF conversion of a real ~135M checkpoint: seconds and peak memory; quantization times.

The checkpoint is the embedded SmolLM2-135M-Instruct (Q4_1 GGUF) loaded through ``transformers``'
GGUF support (dequantized) and saved as safetensors with its tokenizer: a real 135M-parameter
folder (``--dtype`` bf16 by default, as the published checkpoint; kept under ``--workdir``
between runs). The conversion to f16 GGUF runs ``--reps`` times in a fresh child process each,
which reports its own wall time and peak RSS (``VmHWM``), next to the RSS of the same child
after its imports (the floor any conversion pays). Then the f16 file is quantized to Q4_0,
Q4_K_M and Q8_0 (each in llama.cpp's quantizer, timed from the caller).

Target: peak RSS < 1.5 × the largest tensor + 400 MB (the converter streams tensor by tensor).
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
import time
from pathlib import Path

MB = 1e6
# peak_rss_bytes reads VmHWM (this process image's peak RSS), not ru_maxrss: Linux carries ru_maxrss
# across exec, so a child of a big parent (this script, with torch loaded) would report the parent's size.
CHILD = r"""
import json, sys, time

from edge_runtime.converters.hf_to_gguf import check_source, convert_hf_to_gguf
from edge_runtime.device.sensors import peak_rss_bytes

floor = peak_rss_bytes()
info = check_source(sys.argv[1])
started = time.perf_counter()
result = convert_hf_to_gguf(sys.argv[1], sys.argv[2], outtype=sys.argv[3])
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes(),
                  "floor_rss": floor, "largest_tensor": info.largest_tensor_bytes, "n_params": result.n_params,
                  "size": result.size_bytes, "pre": result.tokenizer_pre}))
"""


def prepare_checkpoint(folder: Path, dtype: str) -> Path:
    """The embedded SmolLM2 dequantized by transformers and saved as safetensors (once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_runtime.models.spec import resolve_model

    gguf = resolve_model("smollm2")
    print(f"preparing {folder} from {gguf.name} (transformers' GGUF loader, dequantized) ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
        # save_pretrained refuses a model loaded from GGUF; write its (dequantized) weights ourselves
        state = {k: v.to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        from safetensors.torch import save_file

        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def convert_once(src: Path, out: Path, outtype: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out), outtype],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"conversion failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "edgert-bench-convert")
    parser.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16", help="checkpoint dtype")
    parser.add_argument("--outtype", choices=("f32", "f16", "bf16"), default="f16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quant", default="Q4_0,Q4_K_M,Q8_0")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    src = prepare_checkpoint(args.workdir / f"smollm2-135m-{args.dtype}", args.dtype)
    out = args.workdir / f"smollm2-135m-{args.outtype}.gguf"
    load = os.getloadavg()[0]
    runs = [convert_once(src, out, args.outtype) for _ in range(args.reps)]
    first = runs[0]
    largest = first["largest_tensor"]
    target = 1.5 * largest + 400 * MB
    peak = max(r["peak_rss"] for r in runs)
    secs = [r["seconds"] for r in runs]
    print(f"checkpoint      {src}  ({first['n_params'] / 1e6:.1f}M params, {args.dtype}, load avg {load:.2f})")
    print(f"convert → {args.outtype:<5} {statistics.median(secs):6.2f} s median of {len(secs)} "
          f"(min {min(secs):.2f}, max {max(secs):.2f}); {first['size'] / MB:.0f} MB written, "
          f"{first['size'] / MB / statistics.median(secs):.0f} MB/s; tokenizer.ggml.pre = {first['pre']}")
    print(f"largest tensor  {largest / MB:8.1f} MB")
    print(f"peak RSS        {peak / MB:8.1f} MB  (child after imports: {first['floor_rss'] / MB:.1f} MB; "
          f"conversion adds {(peak - first['floor_rss']) / MB:.1f} MB)")
    print(f"target          {target / MB:8.1f} MB  = 1.5 × largest tensor + 400 MB")
    print(f"peak / target   {peak / target:8.2f}   {'OK' if peak < target else 'MISSED'}")

    from edge_runtime.converters.quantize import quantize_gguf

    for qtype in [q.strip() for q in args.quant.split(",") if q.strip()]:
        dst = args.workdir / f"smollm2-135m-{qtype}.gguf"
        started = time.perf_counter()
        result = quantize_gguf(out, dst, qtype, threads=args.threads)
        wall = time.perf_counter() - started
        print(f"quantize → {qtype:<7} {wall:6.2f} s  {result.size_bytes / MB:6.0f} MB  "
              f"({result.size_bytes / first['size']:.2f} × f16)  threads={args.threads}  "
              f"fallbacks={len(result.fallbacks)}")


if __name__ == "__main__":
    main()
