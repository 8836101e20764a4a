"""The suite's reference check: which reference an artifact answers to, and how its greedy output compares.

A convert output carries its reference in the ``manifest.json`` beside it; an embedded model's
ships with the package (``models/references/``). Both are ``models.reference`` documents.

On the very artifact that wrote the reference, computing with the same arithmetic (the same
llama.cpp build and CPU features, an f16 KV cache, no GPU), the greedy text must match exactly.
Anywhere else the check is teacher-forced: along each reference continuation, how often the
device's greedy next token is the reference's. Free-running text is no measure there: a
quantized artifact leaves the unquantized reference at once (a Q4_0 SmolLM2-135M differs at the
first token of "The capital of France is"), and another SIMD family may flip a near-tie, after
which everything differs; teacher-forced, each flip costs one token.

The bars, measured on this project's machines: a Q4_0 SmolLM2-135M agrees on 0.55-0.81 of the
f16 reference's tokens per prompt, a runtime computing wrongly near 0. So a quantized artifact
needs its manifest's own top-1 agreement less a margin (that figure was measured on other text),
or ``AGREEMENT_FLOOR`` without one; the reference artifact on other kernels ``SAME_WEIGHTS_AGREEMENT``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.models.reference import Reference, read_reference

AGREEMENT_FLOOR = 0.5
AGREEMENT_MARGIN = 0.15
# The same weights through other kernels: only near-ties may flip. A quantized KV cache (q8_0,
# other arithmetic in every attention step) still agrees on 0.97 of SmolLM2's reference tokens here.
SAME_WEIGHTS_AGREEMENT = 0.9


@dataclass(frozen=True)
class ReferenceSource:
    """A reference and where it came from, for messages."""

    reference: Reference
    where: str  # "manifest.json beside the artifact", "the reference shipped for the embedded smollm2"


def find_reference(artifact_path: str) -> tuple[ReferenceSource | None, str]:
    """The reference an artifact is checked against, or why there is none.

    The manifest beside the artifact first (a convert output, checked by ``read_manifest``: a
    damaged one fails the check); else the one shipped for the embedded model of that file name.
    """
    from edge_runtime.models.embedded import embedded_for_file, shipped_reference
    from edge_runtime.models.manifest import has_manifest, read_manifest

    folder = Path(artifact_path).parent
    if has_manifest(folder):
        where = str(folder / "manifest.json")
        ref, why = read_reference(read_manifest(folder, check_files=False).reference, where)
        return (ReferenceSource(ref, where) if ref else None), why
    embedded = embedded_for_file(artifact_path)
    if embedded is None:
        return None, ("the artifact is neither a convert output (no manifest.json beside it) nor an embedded "
                      "model; convert it with `edgert convert` to give it a reference")
    where = f"the reference shipped for the embedded {embedded.name}"
    data = shipped_reference(embedded)
    if data is None:
        return None, f"no reference ships for the embedded {embedded.name} (reinstall edge-runtime)"
    ref, why = read_reference(data, where)
    return (ReferenceSource(ref, where) if ref else None), why


def same_weights(ref: Reference, artifact_path: str, artifact_sha256: str | None) -> bool:
    """Whether the artifact is the one that wrote the reference (by sha256 where known, else by name)."""
    from edge_runtime.files import file_sha256

    path = Path(artifact_path)
    if ref.artifact_sha256 is None:
        return path.name == ref.artifact
    sha = artifact_sha256 or (file_sha256(path) if path.is_file() else None)
    return sha == ref.artifact_sha256


def why_not_exact(ref: Reference, backend: str, settings: Any) -> str:
    """Why the reference artifact may not reproduce the text exactly here ("" when it must)."""
    from edge_runtime.backends.llamacpp import kernel_family

    if backend != "llama.cpp":
        return f"the {backend} backend's kernels are not llama.cpp's"
    if settings.n_gpu_layers:
        return "layers run on the GPU, whose kernels differ from the CPU's that wrote the reference"
    if (settings.type_k, settings.type_v) != ("f16", "f16"):
        return f"the KV cache is {settings.type_k}/{settings.type_v}; the reference was written with f16"
    here = kernel_family()
    if ref.kernels is not None and ref.kernels != here:
        return f"the reference was written by {ref.kernels}; this device runs {here}"
    return ""


def greedy(model: Any, tokens: list[int], n: int) -> list[Any]:
    """The events of ``n`` greedy tokens after ``tokens``."""
    from edge_runtime.backends.base import SamplingParams

    return list(model.generate(tokens, SamplingParams(max_tokens=max(1, n), temperature=0)))


def prompt_tokens(model: Any, ref: Reference, prompt: str) -> list[int]:
    add_bos = model.info.add_bos if ref.add_bos is None else ref.add_bos
    return model.tokenize(prompt, add_bos=add_bos)


def exact_mismatches(model: Any, ref: Reference) -> list[str]:
    """One line per prompt whose free-running greedy text differs from the reference's."""
    reset = getattr(model, "reset", lambda: None)
    out = []
    for case in ref.cases:
        reset()
        n = ref.max_tokens or len(case.tokens) or len(model.tokenize(case.continuation))
        text = "".join(e.text for e in greedy(model, prompt_tokens(model, ref, case.prompt), n))
        if text != case.continuation:
            out.append(f"prompt {case.prompt!r}: got {text!r}, expected {case.continuation!r}")
    return out


def teacher_forced_agreement(model: Any, ref: Reference) -> tuple[int, int]:
    """(agreeing, total) greedy next tokens along every reference continuation."""
    reset = getattr(model, "reset", lambda: None)
    agree = total = 0
    for case in ref.cases:
        prompt = prompt_tokens(model, ref, case.prompt)
        want = list(case.tokens) or model.tokenize(case.continuation)
        reset()
        for i, token in enumerate(want):  # prefix reuse makes each step one token
            agree += greedy(model, prompt + want[:i], 1)[0].token == token
        total += len(want)
    return agree, total


def agreement_bar(same: bool, quality: dict[str, Any] | None) -> float:
    """The share of reference tokens the artifact must agree on (see the module's docstring)."""
    if same:
        return SAME_WEIGHTS_AGREEMENT
    measured = (quality or {}).get("top1_agreement")
    return measured - AGREEMENT_MARGIN if isinstance(measured, (int, float)) else AGREEMENT_FLOOR
