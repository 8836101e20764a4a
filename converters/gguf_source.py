"""A GGUF file as a conversion source: re-typed to f32/f16/bf16 through llama.cpp's quantizer.

A quantized source (the embedded SmolLM2 is Q4_1) is dequantized on the way, so the float base
it yields carries the source's quantization error; ``source_quantized`` and ``source_type`` in
the result say so, and the manifest records them. Quantized rungs are then made from that base
(or straight from the source with ``quantize_gguf(..., allow_requantize=True)``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from edge_runtime.converters.hf_to_gguf import OUTTYPES, ConversionResult, Progress, convert_hf_to_gguf
from edge_runtime.converters.quantize import quantize_gguf
from edge_runtime.errors import InvalidConfigError
from edge_runtime.files import file_sha256
from edge_runtime.formats.gguf import read_gguf_header


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


def convert_to_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str], *, outtype: str = "f16",
                    progress: Progress | None = None) -> ConversionResult:
    """Convert any supported source (a HF folder or a ``.gguf`` file) to a float GGUF."""
    if Path(src).is_file() and str(src).endswith(".gguf"):
        return convert_gguf_to_gguf(Path(src), Path(out), outtype=outtype, progress=progress)
    return convert_hf_to_gguf(src, out, outtype=outtype, progress=progress)
