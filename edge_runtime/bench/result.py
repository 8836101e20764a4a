"""The bench result as data: what was asked, how it was measured, and every figure.

``BenchResult.to_dict()`` is the document ``edgert bench --json`` writes (ARCHITECTURE.md, "Names
users see"); ``schema.py`` holds its JSON Schema, ``from_dict`` rebuilds a checked document.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edge_runtime.bench.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class BenchRequest:
    """What to measure; empty tuples and None mean "what the planner would choose"."""

    models: tuple[str | None, ...] = (None,)
    backends: tuple[str, ...] = ()
    threads: tuple[int, ...] = ()
    ctx: int | None = None
    prompt_tokens: tuple[int, ...] = (32, 128, 512)
    gen_tokens: int = 128
    reps: int = 5
    warmup: int = 1
    prompt_file: str | None = None
    bandwidth_buffer_bytes: int | None = None
    profile: str | None = None
    workers: tuple[str, ...] = ()  # llama.cpp RPC workers ("host:port") to split each model across
    anatomy: bool = False  # also measure each artifact's latency anatomy (bench/anatomy.py)


@dataclass(frozen=True)
class BenchMethod:
    """How the figures were taken, recorded in the result so they can be compared fairly."""

    reps: int
    warmup: int
    threads: tuple[int, ...]
    prompt_tokens: tuple[int, ...]
    gen_tokens: int
    decode_prompt_tokens: int
    ctx: int | None
    backends: tuple[str, ...]
    prompt_source: str
    sampling: str = "greedy"
    isolation: str = "one fresh Python process per result (python -m edge_runtime.bench.worker)"
    statistics: str = "mean and sample standard deviation over reps; warm-up rounds excluded"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchMethod:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        kwargs.setdefault("decode_prompt_tokens", min(kwargs.get("prompt_tokens") or (1,)))
        kwargs.setdefault("ctx", None)
        kwargs.setdefault("backends", ())
        kwargs.setdefault("prompt_source", "unknown")
        kwargs.setdefault("threads", ())
        return cls(**kwargs)


@dataclass(frozen=True)
class ArtifactResult:
    """The figures of one artifact × backend × threads (ARCHITECTURE.md's flat keys)."""

    artifact: dict[str, Any]
    backend: str
    threads: int
    settings: dict[str, Any]
    decode_tok_s: float
    decode_tok_s_sd: float
    prefill_tok_s: float
    prefill_tok_s_sd: float
    ttft_ms: dict[str, float]
    load_s: float
    peak_rss_bytes: int | None
    memory_bandwidth_gbs: float
    decode_ceiling_tok_s: float | None
    roofline: dict[str, Any] | None
    samples: tuple[dict[str, Any], ...]
    prefill_prompt_tokens: int | None = None  # the prompt length prefill_tok_s is measured at
    ttft_ms_sd: dict[str, float] = field(default_factory=dict)
    prefill_tok_s_by_prompt: dict[str, float] = field(default_factory=dict)
    gen_tokens_mean: float | None = None
    rss_baseline_bytes: int | None = None
    peak_rss_increase_bytes: int | None = None
    estimated_memory_bytes: int | None = None
    vram_peak_bytes: int | None = None
    temperature_c: dict[str, float | None] = field(default_factory=dict)
    # the system's 1-minute load average before and after: other work competing for the cores
    load_average: dict[str, float | None] = field(default_factory=dict)
    energy: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    # storage, compute, transfer and cache figures of one reply (bench/anatomy.py), with --anatomy
    anatomy: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """``name quant`` of the artifact."""
        name, quant = self.artifact.get("name") or "?", self.artifact.get("quant")
        return f"{name} {quant}" if quant else str(name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["samples"] = list(self.samples)
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactResult:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["samples"] = tuple(kwargs.get("samples") or ())
        kwargs["notes"] = tuple(kwargs.get("notes") or ())
        return cls(**kwargs)


@dataclass(frozen=True)
class BenchResult:
    """One ``edgert bench`` run on one device: the document ``--json`` writes."""

    created: str
    edgert_version: str
    device: dict[str, Any]
    profile: dict[str, Any] | None
    method: BenchMethod
    memory_bandwidth: dict[str, Any]
    results: tuple[ArtifactResult, ...]
    recommendation: dict[str, Any] | None = None
    skipped: tuple[dict[str, Any], ...] = ()
    schema_version: int = SCHEMA_VERSION
    kind: str = "edgert-bench"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version, "kind": self.kind, "created": self.created,
            "edgert_version": self.edgert_version, "device": self.device, "profile": self.profile,
            "method": self.method.to_dict(), "memory_bandwidth": self.memory_bandwidth,
            "recommendation": self.recommendation, "results": [r.to_dict() for r in self.results],
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchResult:
        """Rebuild a validated document (``bench.schema.load_runs`` checks it first)."""
        return cls(
            created=str(data.get("created") or ""), edgert_version=str(data.get("edgert_version") or "?"),
            device=data["device"], profile=data.get("profile"),
            method=BenchMethod.from_dict(data["method"]), memory_bandwidth=data["memory_bandwidth"],
            results=tuple(ArtifactResult.from_dict(r) for r in data["results"]),
            recommendation=data.get("recommendation"), skipped=tuple(data.get("skipped") or ()),
            schema_version=int(data["schema_version"]), kind=str(data.get("kind") or "edgert-bench"),
        )
