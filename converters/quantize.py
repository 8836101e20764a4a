"""GGUF → GGUF of another type through llama.cpp's own quantizer (``llama_model_quantize``).

The quantizer runs in a child process (``quantize_worker.py``) so that Ctrl-C, a failing
progress callback or a llama.cpp abort stop it at once and leave no partial file: it writes to a
temporary name in the destination folder, renamed into place only on success. Its log (which
llama.cpp sends through ``edge_runtime.llama_cpp``) is parsed for progress and for tensors that
fell back to another type because their rows do not fit the target's block size.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from edge_runtime.converters.worker_process import follow_worker
from edge_runtime.errors import InvalidConfigError, ModelLoadError, ModelNotFoundError
from edge_runtime.formats.gguf import read_gguf_header
from edge_runtime.models.artifact import FLOAT_TYPES

Progress = Callable[[int, int], None]

QUANT_TYPES: dict[str, int] = {
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "BF16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q5_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_S,
    "Q5_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_1,
    "Q5_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_0,
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S,
    "Q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "IQ4_NL": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_NL,
    "IQ4_XS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ4_XS,
    "Q3_K_L": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_L,
    "Q3_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_M,
    "Q3_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q3_K_S,
    "IQ3_M": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ3_M,
    "IQ3_S": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ3_S,
    "IQ3_XS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ3_XS,
    "IQ3_XXS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ3_XXS,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q2_K_S": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K_S,
    "IQ2_M": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ2_M,
    "IQ2_S": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ2_S,
    "IQ2_XS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ2_XS,
    "IQ2_XXS": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ2_XXS,
    "IQ1_M": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ1_M,
    "IQ1_S": llama_cpp.LLAMA_FTYPE_MOSTLY_IQ1_S,
}
# Types whose low-bit tensors llama.cpp refuses to make without an importance matrix (it would
# be garbage); edge-runtime does not compute one, so these are refused up front.
NEEDS_IMATRIX = frozenset({"IQ3_XS", "IQ3_XXS", "Q2_K_S", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS",
                           "IQ1_M", "IQ1_S"})

_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
_FALLBACK = re.compile(
    r"warning:\s+(?P<tensor>\S+)\s+- ncols\s+(?P<ncols>\d+) not divisible by\s+(?P<block>\d+)"
    r" \(required for type\s+(?P<want>\S+)\).*falling back to\s+(?P<got>\S+)"
)


@dataclass(frozen=True)
class QuantizeResult:
    """A quantized file and how it was made."""

    path: Path
    qtype: str
    size_bytes: int
    seconds: float
    fallbacks: list[str] = field(default_factory=list)  # "tensor: q4_K -> q5_0 (ncols 576 ...)"
    source_type: str | None = None  # the source's own type ("F16", "Q4_1")
    source_quantized: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def normalize_qtype(qtype: str) -> str:
    """The canonical spelling of a quant type name (case-insensitive); a clear error if unknown."""
    name = qtype.strip().upper()
    if name not in QUANT_TYPES:
        raise InvalidConfigError(f"unknown quantization type {qtype!r}", f"choose from {', '.join(QUANT_TYPES)}")
    if name in NEEDS_IMATRIX:
        raise InvalidConfigError(
            f"{name} needs an importance matrix (imatrix), which edge-runtime does not compute",
            "choose a type that does not: Q4_K_M, IQ4_NL, Q3_K_M or Q2_K",
        )
    return name


def quantize_gguf(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str, *,
                  threads: int | None = None, allow_requantize: bool = False,
                  progress: Progress | None = None) -> QuantizeResult:
    """Quantize ``src`` to ``qtype`` at ``dst``, atomically, with llama.cpp's quantizer.

    ``progress(done_tensors, n_tensors)`` follows llama.cpp's tensor loop; an exception it raises
    (or Ctrl-C) stops the quantizer and removes the partial file. ``allow_requantize`` permits a
    source that is itself quantized (quality drops twice; the result records it).
    """
    name = normalize_qtype(qtype)
    source = Path(src)
    if not source.is_file():
        raise ModelNotFoundError(f"{source}: no such GGUF file")
    header = read_gguf_header(source)  # rejects damaged files before llama.cpp reads them
    source_type = header.file_type_name
    quantized = any(t.type_name not in FLOAT_TYPES for t in header.tensors if len(t.shape) >= 2)
    if quantized and not allow_requantize:
        raise InvalidConfigError(
            f"{source.name} is already quantized ({source_type}); re-quantizing loses quality twice",
            "pass allow_requantize=True (the manifest then records the quantized source)",
        )
    target = Path(dst)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    request = {"src": str(source), "dst": str(tmp), "qtype": name, "ftype": QUANT_TYPES[name],
               "nthread": threads or os.cpu_count() or 1, "allow_requantize": allow_requantize}
    started = time.perf_counter()
    try:
        fallbacks = _run_worker(request, progress)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return QuantizeResult(path=target, qtype=name, size_bytes=target.stat().st_size,
                          seconds=time.perf_counter() - started, fallbacks=fallbacks,
                          source_type=source_type, source_quantized=quantized)


def _run_worker(request: dict[str, Any], progress: Progress | None) -> list[str]:
    """Run the child and follow its log; return the fallbacks, raise on failure."""
    log = logging.getLogger("edge_runtime.llama_cpp")
    fallbacks: list[str] = []
    result: dict[str, Any] = {}
    n_tensors = 0

    def on_message(msg: dict[str, Any]) -> None:
        nonlocal n_tensors
        if "rc" in msg:
            result.update(rc=int(msg["rc"]), errors=str(msg.get("errors") or ""))
            return
        text = str(msg.get("text", ""))
        log.debug("%s", text)
        if (m := _FALLBACK.search(text)) is not None:
            fallbacks.append(f"{m['tensor']}: {m['want']} -> {m['got']} "
                             f"(row of {m['ncols']} not a multiple of {m['block']})")
        elif progress is not None and (p := _PROGRESS.match(text)) is not None:
            n_tensors = int(p[2])
            progress(int(p[1]) - 1, n_tensors)  # llama.cpp logs a tensor as it starts it

    returncode, tail = follow_worker("edge_runtime.converters.quantize_worker", request, on_message)
    rc, errors = result.get("rc"), result.get("errors", "")
    if rc == 0 and returncode == 0 and progress is not None and n_tensors:
        progress(n_tensors, n_tensors)
    if rc != 0 or returncode != 0:
        why = errors or tail or f"the quantizer exited with status {returncode}"
        why = why.split("failed to quantize:", 1)[-1].strip()
        if "imatrix" in why:
            raise InvalidConfigError(f"llama.cpp: {why}", "this type needs an importance matrix; choose another")
        raise ModelLoadError(f"quantizing to {request['qtype']} failed: {why}")
    return fallbacks
