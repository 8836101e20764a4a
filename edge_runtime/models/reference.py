"""Reference continuations: fixed prompts and the greedy continuation one artifact gives each.

A device checks that what it runs still says the same thing. ``edgert convert`` records the
reference of a build's unquantized artifact in its ``manifest.json``; the package ships the
references of the embedded models (``models/references/<name>.json``, read by ``embedded.py``).
Both are written by one function, ``backends.llamacpp.greedy_reference``, and read here.

The document: ``artifact`` (file name), ``artifact_sha256``, ``sampling`` ("greedy"),
``max_tokens``, ``add_bos``, ``chat_template`` (false: raw prompts), ``kernels`` (the llama.cpp
build and the CPU features its kernels used, so a reader knows whether its own arithmetic is the
same) and ``prompts``: each ``prompt``, its ``continuation`` and the continuation's ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard

# Prompts whose greedy continuation the reference records: facts, code and prose, so a runtime
# that computes wrongly drifts on at least one.
REFERENCE_PROMPTS = (
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
)
REFERENCE_TOKENS = 32
REFERENCE_CTX = 256


@dataclass(frozen=True)
class ReferenceCase:
    """One prompt and the reference artifact's greedy continuation of it."""

    prompt: str
    continuation: str
    tokens: tuple[int, ...]  # empty in references written before tokens were recorded


@dataclass(frozen=True)
class Reference:
    """A reference document, checked (``read_reference``)."""

    artifact: str | None  # file name of the artifact that wrote it
    artifact_sha256: str | None
    max_tokens: int | None
    add_bos: bool | None
    kernels: str | None  # llama.cpp build and CPU features that wrote it; None in older manifests
    cases: tuple[ReferenceCase, ...]


def read_reference(data: Any, where: str) -> tuple[Reference | None, str]:
    """The reference in ``data`` (a manifest's ``reference`` or a shipped file), or why there is none.

    ``where`` names the source in the reason. Entries without a prompt and a continuation are
    left out; a reference left with none is no reference.
    """
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list) or not data["prompts"]:
        return None, f"{where} records no reference continuations"
    cases = tuple(
        ReferenceCase(p["prompt"], p["continuation"], _tokens(p.get("tokens")))
        for p in data["prompts"]
        if isinstance(p, dict) and isinstance(p.get("prompt"), str) and isinstance(p.get("continuation"), str)
    )
    if not cases:
        return None, f"{where}: no reference entry has a prompt and a continuation"
    return Reference(
        artifact=_text(data.get("artifact")), artifact_sha256=_text(data.get("artifact_sha256")),
        max_tokens=data["max_tokens"] if _count(data.get("max_tokens")) else None,
        add_bos=data["add_bos"] if isinstance(data.get("add_bos"), bool) else None,
        kernels=_text(data.get("kernels")), cases=cases,
    ), ""


def reference_is_current(data: Any, artifact_sha256: str) -> TypeGuard[dict[str, Any]]:
    """Whether ``data`` is the reference the writer would write now for that artifact (reusable)."""
    return (isinstance(data, dict) and data.get("artifact_sha256") == artifact_sha256
            and data.get("max_tokens") == REFERENCE_TOKENS and isinstance(data.get("prompts"), list)
            and [p.get("prompt") for p in data["prompts"] if isinstance(p, dict)] == list(REFERENCE_PROMPTS))


def _tokens(value: Any) -> tuple[int, ...]:
    if isinstance(value, list) and all(_count(t) for t in value):
        return tuple(value)
    return ()


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
