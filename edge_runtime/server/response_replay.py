"""Answers from the response cache: the key of a request, the replay of a hit, the recording of a miss.

Used by ``edgert serve`` (``runner``) and ``edgert run`` (``ResponseCachedModel``); no web
framework is imported here. Only deterministic requests are cached: greedy (temperature 0), so
the same model, settings, prompt and parameters give the same tokens. Logprobs are deterministic
too: ``logprobs`` is part of the key and the entry keeps each token's logprob and top
alternatives. Only answers that ended by themselves (``stop``, ``length``) are stored, never a
cancelled one.

A hit replays the stored token events: same text, tokens, logprobs and ``finish_reason``, the
real prompt length, and stats that say what happened: no prompt token evaluated (all of them
``cached_tokens``), and the time the replay took.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edge_runtime.backends.base import CancelToken, GenerationStats, Model, SamplingParams, Settings, TokenEvent
from edge_runtime.models.artifact import Artifact
from edge_runtime.models.response_cache import DEFAULT_MAX_BYTES, ResponseCache, response_key
from edge_runtime.models.trust import recorded_sha256

STORED_REASONS = ("stop", "length")
# The packages whose upgrade may change an answer: kernels, the sampler chain, grammar masks.
VERSIONED_PACKAGES = ("edge-runtime", "llama-cpp-python", "onnxruntime-genai", "onnxruntime", "ai-edge-litert",
                      "llguidance")


@functools.lru_cache(maxsize=1)
def runtime_versions() -> dict[str, str | None]:
    """The installed version of each of ``VERSIONED_PACKAGES`` (None where one is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in VERSIONED_PACKAGES:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """Every sampling parameter, the constraint included, as JSON for the key."""
    out: dict[str, Any] = {}
    for f in fields(params):
        value = getattr(params, f.name)
        if f.name == "logit_bias" and value is not None:
            value = sorted((int(t), float(b)) for t, b in value.items())
        elif f.name == "grammar" and value is not None and not isinstance(value, str):
            value = asdict(value)
        out[f.name] = value
    return out


class CachedResponses:
    """The response cache of one loaded model: its artifact's sha256 and its settings are in every key."""

    def __init__(self, artifact: Artifact, settings: Settings, folder: Path | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store = ResponseCache(folder, max_bytes)
        self.artifact_sha256 = artifact.sha256 or recorded_sha256(Path(artifact.path))
        # what makes the same request give other tokens: the settings, and the code that runs them
        self.settings = {**settings.to_dict(), "versions": runtime_versions()}

    def key(self, tokens: Sequence[int], params: SamplingParams) -> str | None:
        """The request's key, or None when its answer is not deterministic (not greedy)."""
        if not params.greedy:
            return None
        return response_key(self.artifact_sha256, self.settings, tokens, sampling_fields(params))

    def find(self, tokens: Sequence[int], params: SamplingParams) -> tuple[str | None, StoredAnswer | None]:
        """(the request's key, its stored answer): (None, None) when the request is not cacheable,
        (key, None) on a miss."""
        key = self.key(tokens, params)
        return key, self.lookup(key) if key is not None else None

    def lookup(self, key: str) -> StoredAnswer | None:
        """The stored answer of ``key``, or None; one that does not read back whole is removed."""
        entry = self.store.get(key)
        if entry is None:
            return None
        answer = _stored_answer(entry)
        if answer is None:  # valid JSON of another shape: never replayed, never kept
            self.store.remove(key)
        return answer

    def replay(self, answer: StoredAnswer, prompt_tokens: int,
               cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """The stored answer's events again, with the true prompt length and the replay's own time."""
        started = time.perf_counter()
        first_at = None
        last = len(answer.events) - 1
        for i, (token, text, logprob, top) in enumerate(answer.events):
            if cancel is not None and cancel.cancelled:
                yield _last(None, "", "cancelled", prompt_tokens, i, started, first_at)
                return
            first_at = first_at if first_at is not None else time.perf_counter()
            if i < last:
                yield TokenEvent(token, text, logprob=logprob, top_logprobs=top)
            else:
                closing = _last(token, text, answer.finish_reason, prompt_tokens, answer.gen_tokens, started, first_at)
                yield TokenEvent(token, text, answer.finish_reason, closing.stats, logprob, top)

    def recording(self, key: str | None, stream: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
        """``stream`` as it comes; once it ends by itself, its events are stored under ``key`` (None:
        not cacheable, ``stream`` itself)."""
        return stream if key is None else self._recorded(key, stream)

    def _recorded(self, key: str, stream: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
        events: list[dict[str, Any]] = []
        for event in stream:
            events.append({"token": event.token, "text": event.text, "logprob": event.logprob,
                           "top": [list(pair) for pair in event.top_logprobs]})
            if event.finish_reason is not None and event.finish_reason in STORED_REASONS and event.stats:
                self.store.put(key, {"events": events, "finish_reason": event.finish_reason,
                                     "gen_tokens": event.stats.gen_tokens})
            yield event


def _last(token: int | None, text: str, reason: str, prompt_tokens: int, generated: int, started: float,
          first_at: float | None) -> TokenEvent:
    """The closing event of a replay: nothing was evaluated, everything took the replay's time."""
    now = time.perf_counter()
    first = first_at if first_at is not None else now
    stats = GenerationStats(prompt_tokens=prompt_tokens, cached_tokens=prompt_tokens, evaluated_tokens=0,
                            gen_tokens=generated, ttft_s=first - started, prefill_s=0.0, decode_s=now - first)
    return TokenEvent(token, text, reason, stats)


StoredEvent = tuple[int | None, str, float | None, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class StoredAnswer:
    """An entry read back whole: its token events, how it ended and how many tokens it generated."""

    events: tuple[StoredEvent, ...]
    finish_reason: str
    gen_tokens: int


def _stored_answer(entry: dict[str, Any]) -> StoredAnswer | None:
    """``entry`` as the events ``replay`` yields, or None when any part is not what ``recording`` writes."""

    def integer(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    events, reason, generated = entry.get("events"), entry.get("finish_reason"), entry.get("gen_tokens")
    if not isinstance(events, list) or not events or reason not in STORED_REASONS or not integer(generated):
        return None
    parsed: list[StoredEvent] = []
    for item in events:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            return None
        token, logprob, top = item.get("token"), item.get("logprob"), item.get("top") or []
        if token is not None and not integer(token) or logprob is not None and not number(logprob):
            return None
        if not isinstance(top, list) or not all(isinstance(p, list) and len(p) == 2 and integer(p[0])
                                                and number(p[1]) for p in top):
            return None
        parsed.append((token, item["text"], None if logprob is None else float(logprob),
                       tuple((p[0], float(p[1])) for p in top)))
    return StoredAnswer(tuple(parsed), reason, generated)


class ResponseCachedModel:
    """A model whose ``generate`` answers exact repeats from the response cache (``edgert run``);
    everything else is the model's own. ``last_hit`` says whether the last answer was a replay."""

    def __init__(self, model: Model, cached: CachedResponses) -> None:
        self._model = model
        self._cached = cached
        self.last_hit: bool | None = None  # None: the last request was not cacheable

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """The stored answer, or the model's, stored once it ends."""
        key, entry = self._cached.find(tokens, params)
        self.last_hit = None if key is None else entry is not None
        if entry is not None:
            return self._cached.replay(entry, len(tokens), cancel)
        return self._cached.recording(key, self._model.generate(tokens, params, cancel=cancel))

