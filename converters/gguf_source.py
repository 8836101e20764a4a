"""A GGUF file as a conversion source: re-typed to f32/f16/bf16 through llama.cpp's quantizer.

A quantized source (the embedded SmolLM2 is Q4_1) is dequantized on the way, so the float base
it yields carries the source's quantization error; ``source_quantized`` and ``source_type`` in
the result say so, and the manifest records them. Quantized rungs are then made from that base
(or straight from the source with ``quantize_gguf(..., allow_requantize=True)``).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from edge_runtime.errors import InvalidConfigError
from edge_runtime.formats.gguf import read_gguf_header

from edge_runtime.converters.hf_to_gguf import OUTTYPES, ConversionResult, Progress
from edge_runtime.converters.quantize import quantize_gguf


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf_to_gguf(src: Path, out: Path, *, outtype: str = "f16",
                         progress: Progress | None = None) -> ConversionResult:
    """Re-type a GGUF file to ``outtype`` (f32, f16, bf16), dequantizing where needed, atomically.

    ``progress(done_tensors, n_tensors)`` as in ``quantize_gguf``.
    """
    if outtype not in OUTTYPES:
        raise InvalidConfigError(f"unknown outtype {outtype!r}", f"choose one of {', '.join(OUTTYPES)}")
    started = time.perf_counter()
    header = read_gguf_header(src)
    source_sha = file_sha256(Path(src))
    result = quantize_gguf(src, out, outtype.upper(), allow_requantize=True, progress=progress)
    ctx = header.arch_key("context_length")
    pre = header.get("tokenizer.ggml.pre")
    return ConversionResult(
        path=result.path, arch=header.architecture, hf_architecture=None, n_params=header.n_params,
        n_tensors=len(header.tensors), outtype=outtype, source_sha256=source_sha,
        chat_template=header.chat_template, source_quantized=result.source_quantized,
        source_type=result.source_type or "unknown", size_bytes=result.size_bytes,
        seconds=time.perf_counter() - started, context_length=ctx if isinstance(ctx, int) else None,
        tokenizer_pre=pre if isinstance(pre, str) else None,
    )
