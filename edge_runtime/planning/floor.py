"""The decode floor: the speed a healthy device of a profile's class reaches with any model.

A profile states what a healthy device of its class has (``[floor]`` in ``profiles/*.toml``, each
figure with its source): the read bandwidth it sustains, the arithmetic its cores (or GPU) sustain
in llama.cpp's kernels, the shortest decode step it takes whatever the model, and the share of
those ceilings a healthy device reaches. An artifact brings its bytes read per token (what
``bench/roofline.py`` counts: the weights a token touches plus the KV cache) and its parameter
count. Three ceilings follow, the roofline with a latency roof:

- memory: bandwidth ÷ bytes per token. Decoding reads every weight once per token; this binds
  every model too big for the caches, which is every model worth running.
- compute: GFLOPS ÷ (2 × parameters). A matrix-vector product costs two FLOPs (a multiply and an
  add) per weight; this binds where the cores are weak for their memory (SSE-only x86, a Pi 4).
- latency: 1 ÷ the shortest step. Kernel launches and thread synchronisation cost the same per
  token whatever the model's size; this binds tiny models, most of all on GPUs.

``floor = efficiency × min(memory, compute, latency)``. So a Raspberry Pi 5 (9 GB/s, 75 GFLOPS,
12 ms, 60 %) has a floor of 1.2 tok/s for an 8B Q4_K_M (4.6 GB per token: memory-bound) and
50 tok/s for the embedded SmolLM2 (97 MB per token: latency-bound). ``tests/test_floor.py`` works
these out by hand for each class against the published runs its profile cites. A profile may
also name a model with a floor of its own (``[[floor.override]]``: a published measurement of
that very model), which replaces the formula for that model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

PROCESSORS = ("cpu", "gpu")


@dataclass(frozen=True)
class ModelFloor:
    """A floor for one model and quant, replacing the formula for it."""

    model: str  # "Llama-3.2-3B-Instruct", matched in the artifact's name or path
    format: str  # "gguf"
    quant: str  # "Q4_0"
    decode_tok_s: float
    n_ctx: int
    source: str  # where the number comes from

    def matches(self, name: str, path: str, quant: str | None) -> bool:
        """Whether an artifact (its name, path and quant) is this floor's model and quant."""
        return _norm(self.model) in _norm(f"{name} {path}") and _norm(self.quant) == _norm(quant or "")


@dataclass(frozen=True)
class DecodeFloor:
    """What a healthy device of a profile's class has, and the share of its ceilings it reaches.

    The figures are None only in documents written before profiles stated them (an old bench
    result): those floors hold only their one model (``overrides``).
    """

    bandwidth_gbs: float | None  # sustained read bandwidth, 10^9 bytes/s (what `edgert bench` measures)
    compute_gflops: float | None  # sustained arithmetic in llama.cpp's quantized kernels
    min_token_ms: float  # the shortest decode step whatever the model (0: no latency roof)
    efficiency: float | None  # the share of the lowest ceiling a healthy device reaches
    cores: int | None
    core_class: str  # "Cortex-A76 @ 2.4 GHz"
    processor: str  # "cpu" or "gpu": which one the figures describe
    source: str  # where the figures come from
    overrides: tuple[ModelFloor, ...] = field(default=())

    @property
    def has_figures(self) -> bool:
        return bool(self.bandwidth_gbs and self.efficiency)

    @property
    def summary(self) -> str:
        """The figures in a few words: ``9 GB/s · 75 GFLOPS · 60 % of the roofline``."""
        if not self.has_figures:
            return "no class figures"
        parts = [f"{self.bandwidth_gbs:g} GB/s"]
        if self.compute_gflops:
            parts.append(f"{self.compute_gflops:g} GFLOPS")
        if self.min_token_ms:
            parts.append(f"≥ {self.min_token_ms:g} ms/token")
        return " · ".join(parts) + f" · {self.efficiency:.0%} of the roofline"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodeFloor:
        """Rebuild from ``to_dict()``, or from the one-model floor older bench results hold."""
        if "bandwidth_gbs" not in data and "decode_tok_s" in data:
            return cls(None, None, 0.0, None, None, "", "cpu", str(data.get("source") or ""),
                       (_model_floor(data),))
        return cls(
            bandwidth_gbs=_number(data.get("bandwidth_gbs")), compute_gflops=_number(data.get("compute_gflops")),
            min_token_ms=_number(data.get("min_token_ms")) or 0.0, efficiency=_number(data.get("efficiency")),
            cores=data["cores"] if isinstance(data.get("cores"), int) else None,
            core_class=str(data.get("core_class") or ""), processor=str(data.get("processor") or "cpu"),
            source=str(data.get("source") or ""),
            overrides=tuple(_model_floor(o) for o in data.get("overrides") or () if isinstance(o, dict)),
        )


@dataclass(frozen=True)
class FloorEstimate:
    """The floor for one artifact, and how it was reached."""

    tok_s: float
    bound: str  # "memory", "compute", "latency" or "model" (an override)
    ceilings: dict[str, float]  # tok/s per roof that could be worked out
    how: str  # "60% of the memory ceiling 92 tok/s (9 GB/s ÷ 98 MB per token)"


def decode_floor(floor: DecodeFloor, *, bytes_per_token: float | None, n_params: int | None,
                 name: str = "", path: str = "", quant: str | None = None) -> FloorEstimate | None:
    """The decode floor of one artifact on a healthy device of the class, or None when unknowable.

    ``bytes_per_token`` is what one decode step reads (``Roofline.bytes_per_token``; a file's size
    when no roofline was worked out); ``n_params`` feeds the compute ceiling, which is left out
    when unknown. An override for the artifact (by ``name``/``path`` and ``quant``) wins.
    """
    for override in floor.overrides:
        if override.matches(name, path, quant):
            return FloorEstimate(override.decode_tok_s, "model", {}, f"the profile's floor for {override.model} "
                                 f"{override.quant} ({override.source})")
    bandwidth, efficiency = floor.bandwidth_gbs, floor.efficiency
    if not bandwidth or not efficiency or not bytes_per_token or bytes_per_token <= 0:
        return None
    ceilings = {"memory": bandwidth * 1e9 / bytes_per_token}
    reasons = {"memory": f"{bandwidth:g} GB/s ÷ {bytes_per_token / 1e6:,.0f} MB per token"}
    if floor.compute_gflops and n_params:
        ceilings["compute"] = floor.compute_gflops * 1e9 / (2 * n_params)
        reasons["compute"] = f"{floor.compute_gflops:g} GFLOPS ÷ 2 × {n_params / 1e9:.2f}B parameters"
    if floor.min_token_ms > 0:
        ceilings["latency"] = 1000 / floor.min_token_ms
        reasons["latency"] = f"a step takes at least {floor.min_token_ms:g} ms"
    bound = min(ceilings, key=ceilings.__getitem__)
    tok_s = efficiency * ceilings[bound]
    how = f"{efficiency:.0%} of the {bound} ceiling {ceilings[bound]:.1f} tok/s ({reasons[bound]})"
    return FloorEstimate(tok_s, bound, ceilings, how)


def _model_floor(data: dict[str, Any]) -> ModelFloor:
    return ModelFloor(model=str(data.get("model") or ""), format=str(data.get("format") or "gguf"),
                      quant=str(data.get("quant") or ""), decode_tok_s=float(data.get("decode_tok_s") or 0),
                      n_ctx=int(data.get("n_ctx") or 0), source=str(data.get("source") or ""))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())
