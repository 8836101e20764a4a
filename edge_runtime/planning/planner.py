"""The planner: choose backend, artifact and settings for this device, and say why.

Backends are tried in the profile's preference order (those not available here are rejected with
the reason), artifacts in the order of the profile's quant ladder, and for each the settings are
fitted to the memory budget: GPU layers to free VRAM, a quantized KV cache before a shorter context
(``kv_cache``), the context to what is left. The first artifact that fits wins; every alternative
that lost is listed with why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_runtime import backends as registry
from edge_runtime.backends.base import Availability, Settings
from edge_runtime.device.info import DeviceInfo
from edge_runtime.errors import BackendUnavailableError, DoesNotFitError, EdgeRuntimeError
from edge_runtime.models.artifact import Artifact
from edge_runtime.models.prompt_cache import support_reason as prompt_cache_support
from edge_runtime.planning.kv_cache import kv_levers, refused_kv_types
from edge_runtime.planning.memory import MemoryEstimate
from edge_runtime.planning.profiles import DeviceProfile
from edge_runtime.planning.split import WorkerShare, split_over, usable_bytes, worker_shares

if TYPE_CHECKING:
    from edge_runtime.backends.llamacpp.rpc import WorkerDevice

MIB = 1 << 20
GIB = 1 << 30
MIN_CTX = 256
# Free VRAM the planner leaves to the driver and other programs (CUDA context, display).
VRAM_RESERVE_BYTES = 512 * MIB


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for; None means "let the planner choose"."""

    ctx: int | None = None
    threads: int | None = None
    backend: str | None = None
    n_gpu_layers: int | None = None
    n_parallel: int = 1
    kv_cache_type: str | None = None
    force: bool = False  # when nothing fits, take the first candidate anyway (--force)
    workers: tuple[WorkerDevice, ...] = ()  # llama.cpp RPC workers' devices to offload layers to


@dataclass(frozen=True)
class Rejection:
    """An alternative the planner did not take."""

    backend: str
    artifact: str | None
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "artifact": self.artifact, "why": self.why}


@dataclass(frozen=True)
class Plan:
    """The backend, artifact and settings to run, the memory they need, and the reasons."""

    backend: str
    artifact: Artifact
    settings: Settings
    memory: MemoryEstimate
    budget_bytes: int
    profile: str
    reasons: tuple[str, ...]
    rejected: tuple[Rejection, ...] = field(default=())
    workers: tuple[WorkerShare, ...] = ()  # where a split model's offloaded layers go

    def to_dict(self) -> dict[str, Any]:
        """The plan as ``edgert plan --json`` prints it (``workers`` only for a split model)."""
        workers = {"workers": [w.to_dict() for w in self.workers]} if self.workers else {}
        return {
            "backend": self.backend,
            "artifact": self.artifact.to_dict(),
            "settings": self.settings.to_llama_kwargs(),
            "memory": self.memory.to_dict(),
            "budget_bytes": self.budget_bytes,
            "profile": self.profile,
            "reasons": list(self.reasons),
            "rejected": [r.to_dict() for r in self.rejected],
            **workers,
        }


class _NoFit(Exception):
    """One artifact that does not fit, with the numbers and what would fit instead."""

    def __init__(self, why: str, suggestion: str | None = None) -> None:
        super().__init__(why)
        self.why = why
        self.suggestion = suggestion


def memory_budget(device: DeviceInfo, profile: DeviceProfile) -> int:
    """RAM the model may use: what is available now, less the profile's headroom."""
    available = device.memory.available_bytes or device.memory.total_bytes or 0
    return max(0, available - profile.headroom_bytes)


def choose_plan(
    artifacts: list[Artifact],
    device: DeviceInfo,
    profile: DeviceProfile,
    request: PlanRequest | None = None,
) -> Plan:
    """The best plan for these artifacts here; raises ``DoesNotFitError`` when none fits.

    With ``request.force``, when none fits, the first candidate is planned anyway with the
    settings asked for, and its reasons say by how much it misses the budget.
    """
    request = request or PlanRequest()
    if not artifacts:
        raise EdgeRuntimeError("there is no artifact to plan for")
    try:
        return _choose(artifacts, device, profile, request, overcommit=False)
    except DoesNotFitError:
        if not request.force:
            raise
        return _choose(artifacts, device, profile, request, overcommit=True)


def _choose(artifacts: list[Artifact], device: DeviceInfo, profile: DeviceProfile, request: PlanRequest,
            *, overcommit: bool) -> Plan:
    budget = memory_budget(device, profile)
    rejected: list[Rejection] = []
    suggestions: list[str] = []
    for name in _backend_order(profile, request):
        spec = registry.backend_spec(name)
        if request.workers and name != "llama.cpp":
            why = "--workers splits GGUF models on llama.cpp only"
            if request.backend is not None:
                raise BackendUnavailableError(f"the {name} backend cannot use workers: {why}",
                                              "drop --backend, or --workers")
            rejected.append(Rejection(name, None, why))
            continue
        availability = _availability(device, name)
        if not availability.available:
            why = f"not available here: {availability.reason or 'not installed'}"
            if request.backend is not None:
                raise BackendUnavailableError(f"the {name} backend is {why}", availability.install_hint)
            if availability.install_hint:
                why += f" ({availability.install_hint})"
            rejected.append(Rejection(name, None, why))
            continue
        candidates = [a for a in artifacts if a.format in spec.formats]
        if not candidates:
            rejected.append(Rejection(name, None, f"no {'/'.join(spec.formats)} artifact"))
            continue
        for artifact, rung_reason in _ladder_order(candidates, profile):
            try:
                settings, memory, fit_reasons, shares = _fit(artifact, availability, device, profile, request,
                                                             budget, overcommit)
            except _NoFit as miss:
                rejected.append(Rejection(name, artifact.label, miss.why))
                if miss.suggestion:
                    suggestions.append(miss.suggestion)
                continue
            reasons = [
                f"profile {profile.id}: backend order {', '.join(profile.backends)}"
                + ("" if request.backend is None else f"; --backend {request.backend} forced"),
                f"{name} {availability.version or ''} available "
                f"({', '.join(availability.devices) or 'CPU'})".replace("  ", " "),
                rung_reason,
                *fit_reasons,
                f"memory: est. {_fmt(memory.total_bytes)} of {_fmt(budget)} budget "
                f"({_fmt(device.memory.available_bytes or 0)} available − {_fmt(profile.headroom_bytes)} headroom)",
                prompt_cache_support(name, split=bool(settings.rpc_servers)),
            ]
            return Plan(name, artifact, settings, memory, budget, profile.id, tuple(reasons), tuple(rejected),
                        shares)
    raise _does_not_fit(rejected, suggestions, budget)


def _backend_order(profile: DeviceProfile, request: PlanRequest) -> list[str]:
    if request.backend is not None:
        registry.backend_spec(request.backend)  # unknown names fail here, listing the known ones
        return [request.backend]
    order = [b for b in profile.backends if any(s.name == b for s in registry.BACKENDS)]
    return order + [s.name for s in registry.BACKENDS if s.name not in order]


def _availability(device: DeviceInfo, name: str) -> Availability:
    found = device.backend(name)
    if found is not None:
        return found
    return registry.probe(name)


def _ladder_order(candidates: list[Artifact], profile: DeviceProfile) -> list[tuple[Artifact, str]]:
    """Candidates in the order of the profile's quant ladder, then the rest by size."""
    if len(candidates) == 1:
        return [(candidates[0], f"{candidates[0].label}: the only artifact")]
    ladder = [q.lower() for q in profile.quant_ladder(candidates[0].format)]
    ranked: list[tuple[Artifact, str]] = []
    for i, rung in enumerate(ladder):
        for a in candidates:
            if (a.quant or "").lower() == rung:
                ranked.append((a, f"{a.label}: rung {i + 1} of the {profile.id} {a.format} ladder"))
    rest = sorted((a for a in candidates if (a.quant or "").lower() not in ladder), key=lambda a: -a.size_bytes)
    ranked += [(a, f"{a.label}: not in the profile's ladder, tried by size") for a in rest]
    return ranked


def _fit(
    artifact: Artifact,
    availability: Availability,
    device: DeviceInfo,
    profile: DeviceProfile,
    request: PlanRequest,
    budget: int,
    overcommit: bool = False,
) -> tuple[Settings, MemoryEstimate, list[str], tuple[WorkerShare, ...]]:
    estimate, n_ctx_model, n_layer = _estimator(artifact, device, profile, request)
    reasons: list[str] = []
    threads = request.threads or profile.threads or device.cpu.performance_cores or device.cpu.physical_cores or 1
    reasons.append(f"threads {threads}: " + ("--threads" if request.threads else
                   "profile" if profile.threads else "physical performance cores"))
    if request.ctx is not None:
        want = min(request.ctx, n_ctx_model)
        reasons.append(f"ctx {want}: --ctx" + (" capped at the model's context" if want < request.ctx else ""))
    else:
        want = min(profile.default_ctx, n_ctx_model)
        reasons.append(f"ctx {want}: profile default (model context {n_ctx_model})")
    # Only GGUF layers can be offloaded layer by layer; other formats pick their device at load.
    # Workers, when given, take the offloaded layers instead of a local GPU.
    workers = request.workers if artifact.format == "gguf" else ()
    gpu = _usable_gpu(device, availability, profile, request) if artifact.format == "gguf" and not workers else None
    offload_budget = sum(usable_bytes(w) for w in workers) if workers else _vram_budget(gpu) if gpu else 0
    kv = request.kv_cache_type or profile.kv_cache_type

    def fits(n_ctx: int, gpu_layers: int) -> bool:
        est = estimate(n_ctx, gpu_layers, kv)
        if gpu is not None and gpu.unified_memory:
            return est.total_bytes + est.vram_bytes <= budget  # one pool for both
        offload_ok = (gpu is None and not workers) or est.vram_bytes <= offload_budget
        return est.total_bytes <= budget and offload_ok

    def best_gpu_layers(n_ctx: int) -> int:
        if gpu is None and not workers:
            return 0
        if request.n_gpu_layers is not None:
            return request.n_gpu_layers
        for layers in range(n_layer + 1, -1, -1):  # n_layer + 1 also offloads the output layer
            if fits(n_ctx, layers):
                return layers
        return 0

    n_ctx = want
    gpu_layers = best_gpu_layers(n_ctx)
    if not fits(n_ctx, gpu_layers) and request.kv_cache_type is None and request.ctx is None and not overcommit:
        # Lever one: a quantized KV cache at the profile's context (kv_cache.py says why this order);
        # an explicit --ctx is planned as asked, with the profile's KV type, or refused.
        reasons += refused_kv_types(artifact)
        needed = estimate(n_ctx, gpu_layers, kv).total_bytes
        for lighter, cost in kv_levers(artifact, kv):
            previous, kv = kv, lighter
            if fits(n_ctx, best_gpu_layers(n_ctx)):
                reasons.append(f"kv cache {lighter} (flash attention on, which llama.cpp needs for it) before a "
                               f"shorter context: {previous} needs {_fmt(needed)} at ctx {n_ctx}, the budget is "
                               f"{_fmt(budget)}; {cost}")
                gpu_layers = best_gpu_layers(n_ctx)
                break
            kv = previous
    if not fits(n_ctx, gpu_layers):
        largest = _largest_fitting_ctx(lambda c: fits(c, best_gpu_layers(c)), want)
        need = estimate(want, gpu_layers, kv).total_bytes
        why = f"needs {_fmt(need)} at ctx {want}, the budget is {_fmt(budget)}"
        if overcommit:
            reasons.append(f"--force: loaded although it {why}")
        elif largest is None:
            raise _NoFit(why, None)
        elif request.ctx is not None:
            raise _NoFit(why, f"--ctx {largest} fits with {artifact.label}")
        else:
            reasons.append(f"ctx lowered from {want} to {largest} to fit the memory budget"
                           + (f" (kv cache {kv}: no quantized KV type fits ctx {want} either)"
                              if request.kv_cache_type is None and kv_levers(artifact, kv) else ""))
            n_ctx, gpu_layers = largest, best_gpu_layers(largest)
    memory = estimate(n_ctx, gpu_layers, kv)
    if gpu is not None:
        reasons.append(f"gpu layers {gpu_layers} of {n_layer + 1} on {gpu.name} "
                       f"(est. {_fmt(memory.vram_bytes)} of {_fmt(_vram_budget(gpu))} usable VRAM)")
    if workers and gpu_layers == 0:  # a split with nothing on the workers is a local model
        reasons.append("workers: not one layer fits in the memory they may use; all stay on this CPU")
        workers = ()
    shares = worker_shares(workers, n_layer, gpu_layers) if workers else ()
    if shares:
        reasons.append(f"layers: {n_layer + 1 - sum(s.layers for s in shares)} of {n_layer + 1} on this CPU, "
                       + ", ".join(f"{s.layers} on {s.endpoint}" for s in shares)
                       + f" (est. {_fmt(memory.vram_bytes)} there, split by what each may hold)")
    settings = Settings(
        n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=profile.n_batch,
        n_ubatch=profile.n_batch, n_gpu_layers=gpu_layers, flash_attn=True, type_k=kv, type_v=kv,
        use_mmap=True, n_parallel=request.n_parallel,
        rpc_servers=tuple(dict.fromkeys(w.endpoint for w in workers)),
        tensor_split=split_over(workers) if workers else (),
    )
    return settings, memory, reasons, shares


def _estimator(
    artifact: Artifact, device: DeviceInfo, profile: DeviceProfile, request: PlanRequest
) -> tuple[Callable[[int, int, str], MemoryEstimate], int, int]:
    """(estimate(n_ctx, gpu_layers, kv cache type), the model's largest context, its layer count)."""
    if artifact.format == "gguf":
        from edge_runtime.formats.gguf import read_gguf_header
        from edge_runtime.planning.memory import estimate_memory

        header = read_gguf_header(artifact.path, parts=artifact.parts)

        def gguf_estimate(n_ctx: int, gpu_layers: int, kv: str) -> MemoryEstimate:
            return estimate_memory(header, n_ctx=n_ctx, n_parallel=request.n_parallel, type_k=kv, type_v=kv,
                                   n_gpu_layers=gpu_layers, n_batch=profile.n_batch, n_ubatch=profile.n_batch,
                                   flash_attn=True, cpu_features=device.cpu.flags or None)

        n_ctx_model = artifact.n_ctx_train or header.arch_key("context_length") or 2048
        return gguf_estimate, int(n_ctx_model), int(header.arch_key("block_count") or 0)
    spec = next(s for s in registry.BACKENDS if artifact.format in s.formats)
    if spec.estimator is None:
        raise _NoFit(f"no memory estimate for {artifact.format} artifacts")
    estimate_other = registry.resolve(spec.estimator)

    def other_estimate(n_ctx: int, gpu_layers: int, kv: str) -> MemoryEstimate:
        return estimate_other(artifact.path, n_ctx=n_ctx, n_parallel=request.n_parallel)  # type: ignore[operator]

    # For TFLite the context is fixed by the exported KV cache; converters record it here.
    return other_estimate, int(artifact.n_ctx_train or profile.default_ctx), 0


def _usable_gpu(device: DeviceInfo, availability: Availability, profile: DeviceProfile, request: PlanRequest):
    if request.n_gpu_layers == 0 or not availability.gpu_offload:
        return None
    if not profile.gpu_offload and request.n_gpu_layers is None:
        return None
    return next((g for g in device.gpus if g.unified_memory or g.memory_free_bytes), None)


def _vram_budget(gpu: Any) -> int:
    return max(0, (gpu.memory_free_bytes or 0) - VRAM_RESERVE_BYTES)


def _largest_fitting_ctx(fits: Any, upper: int) -> int | None:
    """The largest multiple of 256 (at least ``MIN_CTX``) below ``upper`` that fits."""
    if not fits(MIN_CTX):
        return None
    lo, hi = MIN_CTX // 256, max(1, upper // 256)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * 256):
            lo = mid
        else:
            hi = mid - 1
    return lo * 256


def _does_not_fit(rejected: list[Rejection], suggestions: list[str], budget: int) -> DoesNotFitError:
    detail = "; ".join(f"{r.artifact or r.backend}: {r.why}" for r in rejected) or "no candidates"
    hint = suggestions[0] if suggestions else "use a smaller quant or model, or free memory"
    error = DoesNotFitError(f"nothing fits this device's memory budget of {_fmt(budget)} ({detail})", hint)
    error.rejected = tuple(rejected)  # type: ignore[attr-defined]
    return error


def _fmt(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"
