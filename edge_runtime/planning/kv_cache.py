"""The KV cache type as a lever of the planner: a quantized cache before a shorter context.

When the profile's default context does not fit the memory budget with the profile's KV type, the
planner tries a quantized KV cache at that same context, ``q8_0`` first, then ``q4_0`` (each with
flash attention, which llama.cpp needs for a quantized V cache), and only then shrinks the
context with the profile's type. Keeping the context keeps what the device was profiled for; the KV
cache's precision costs little quality, and that cost is measured: the evaluator (``edgert
convert``/``eval``) records per artifact the KL divergence of each KV type against an f16 cache
on the same windows (``models.manifest.kv_cache_costs``). A type whose measured KLD exceeds
``KV_KLD_LIMIT``, or one llama.cpp cannot use with the model, is never chosen; an artifact
without the measurement may use either, and the reason says the cost is not measured. An explicit
``--ctx`` or KV type is planned as asked: the lever is the planner's own choice, never a change to
what the user named.
"""

from __future__ import annotations

from edge_runtime.models.artifact import Artifact
from edge_runtime.models.manifest import kv_cache_costs, kv_cache_unsupported

KV_LEVER_TYPES = ("q8_0", "q4_0")  # lightest loss first
# Mean KL divergence (nats per token) against an f16 cache beyond which a KV type is refused:
# near-lossless quants of the weights sit well under it, q4_0 KV on small models can exceed it.
KV_KLD_LIMIT = 0.05
# q8_0 and q4_0 store 32 values a block; llama.cpp refuses a context whose K or V head size the
# block does not divide ("K cache type ... does not divide n_embd_head_k"): phi-2's 80, for one.
QUANT_BLOCK = 32


def head_sizes(artifact: Artifact) -> tuple[int, int] | None:
    """(K, V) head sizes of a GGUF artifact from its header, or None where it does not say."""
    from edge_runtime.formats.gguf import read_gguf_header

    header = read_gguf_header(artifact.path, parts=artifact.parts)
    n_embd, n_head = header.arch_key("embedding_length"), header.arch_key("attention.head_count")
    n_head = max(n_head.values or (0,)) if hasattr(n_head, "values") else n_head  # per-layer counts
    plain = n_embd // n_head if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 else None
    k, v = header.arch_key("attention.key_length", plain), header.arch_key("attention.value_length", plain)
    return (k, v) if isinstance(k, int) and isinstance(v, int) else None


def _blocks_misfit(artifact: Artifact) -> str | None:
    """Why the quantized KV types cannot hold this model's heads, or None when they can."""
    sizes = head_sizes(artifact)
    if sizes is None or all(size % QUANT_BLOCK == 0 for size in sizes):
        return None
    return (f"its heads hold {sizes[0]} (K) and {sizes[1]} (V) values, which blocks of "
            f"{QUANT_BLOCK} do not divide")


def kv_levers(artifact: Artifact, current: str) -> list[tuple[str, str]]:
    """(KV type, what its quality cost is, in words) for each type the planner may switch to,
    lightest loss first; types no smaller than ``current`` are left out, and from the first type
    measured over the limit on, none is offered (the later ones lose more)."""
    if artifact.format != "gguf" or _blocks_misfit(artifact):  # only llama.cpp quantizes its KV cache
        return []
    order = ("f32", "f16", "bf16", *KV_LEVER_TYPES)
    costs = kv_cache_costs(artifact.quality)
    unsupported = kv_cache_unsupported(artifact.quality)
    out = []
    for kv in KV_LEVER_TYPES:
        if (current in order and order.index(current) >= order.index(kv)) or kv in unsupported:
            continue
        cost = costs.get(kv)
        if cost is None:
            out.append((kv, "quality cost not measured for this artifact"))
            continue
        kld = cost["kld"]
        top1 = f", top-1 {cost['top1_agreement']:.1%}" if cost.get("top1_agreement") is not None else ""
        if kld > KV_KLD_LIMIT:
            break  # the types after it lose more still
        out.append((kv, f"measured KLD {kld:.4f} against f16 KV{top1}, within {KV_KLD_LIMIT}"))
    return out


def refused_kv_types(artifact: Artifact) -> list[str]:
    """Reasons, one per KV type the model's heads or the manifest's measurement rule out."""
    misfit = _blocks_misfit(artifact) if artifact.format == "gguf" else None
    if misfit:
        return [f"kv cache {kv} refused: {misfit}" for kv in KV_LEVER_TYPES]
    costs = kv_cache_costs(artifact.quality)
    unsupported = kv_cache_unsupported(artifact.quality)
    return [f"kv cache {kv} refused: " + (f"llama.cpp cannot use it with this model ({unsupported[kv]})"
                                          if kv in unsupported else
                                          f"measured KLD {costs[kv]['kld']:.4f} against f16 exceeds {KV_KLD_LIMIT}")
            for kv in KV_LEVER_TYPES if kv in unsupported or (kv in costs and costs[kv]["kld"] > KV_KLD_LIMIT)]
