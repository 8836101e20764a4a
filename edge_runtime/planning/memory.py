"""How much memory a GGUF model needs with given settings, from its header alone (no load).

The estimate follows what llama.cpp (as vendored by llama-cpp-python 0.3.x) allocates and what of
it a process actually touches:

- weights: mapped file pages from the first to the last CPU tensor (llama.cpp maps the file
  with MAP_POPULATE, then unmaps only the ranges before and after), plus the copies it makes
  of the matrices it repacks for this CPU's SIMD kernels; offloaded layers go to VRAM;
- KV cache: K and V rows per layer and cell, sliding-window layers holding only their window;
- compute: the activations of one micro-batch (llama.cpp reserves a buffer for the worst case,
  logits for every token of a batch included, but only what a step uses gets touched), the
  attention masks, and the logits and sampling arrays of each sequence;
- overhead: importing llama_cpp (Python bindings, numpy, the shared libraries) and the
  tokenizer tables llama.cpp builds in memory.

Constants marked "calibrated" come from `benchmarks/memory_estimate.py` (x86-64 Linux,
llama-cpp-python 0.3.36); the rest mirror llama.cpp's own sizing rules.
"""

from __future__ import annotations

import functools
import platform
import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from edge_runtime.backends.base import MemoryEstimate
from edge_runtime.errors import InvalidConfigError
from edge_runtime.formats.gguf_header import GGUFArray, GGUFHeader, GGUFTensor, gguf_constants

MiB = 1 << 20
KV_PAD = 256  # llama.cpp pads the context (and the SWA cache) to a multiple of 256 cells
# Calibrated: `import llama_cpp` (bindings, numpy, libllama/libggml pages) and the fixed part of
# a loaded model and context (structs, ggml contexts, thread pool).
IMPORT_BYTES = 33 * MiB
LOAD_BASE_BYTES = 7 * MiB
# Calibrated: the tokenizer as llama.cpp holds it (the GGUF strings while loading, then the
# id->token table, the token->id map and the piece cache) per token, and per BPE merge rule.
BYTES_PER_TOKEN = 190
BYTES_PER_MERGE = 112
# Per vocabulary entry and sequence: the logits row, llama.cpp's output buffer row and the
# sampler's candidate array (id, logit, p).
BYTES_PER_LOGIT = 4 + 4 + 12

# Architectures whose sliding-window layers follow a fixed period (llama.cpp's load_swa_pattern
# default per model: every n-th layer is global; dense_first puts it first in each period).
SWA_PATTERNS: dict[str, tuple[int, bool]] = {
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "gemma-embedding": (6, False),
    "cohere2": (4, False),
    "llama4": (4, False),
    "exaone4": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "afmoe": (4, False),
    "smallthinker": (4, True),
    "plamo3": (8, False),
}


@dataclass(frozen=True)
class _Shape:
    """The hyperparameters the estimate needs, read once from the header."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_vocab: int
    n_merges: int
    heads: tuple[int, ...]  # per layer
    heads_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    swa_window: int
    swa_layers: frozenset[int]


def estimate_memory(
    header: GGUFHeader,
    *,
    n_ctx: int,
    n_parallel: int = 1,
    type_k: str = "f16",
    type_v: str = "f16",
    n_gpu_layers: int = 0,
    n_batch: int = 512,
    n_ubatch: int = 512,
    flash_attn: bool = True,
    use_mmap: bool = True,
    swa_full: bool = False,
    cpu_features: Collection[str] | None = None,
) -> MemoryEstimate:
    """Estimate RAM (and VRAM) for loading `header`'s model with these settings and generating.

    `n_ctx` is the context of each of the `n_parallel` sequences (llama.cpp gets their product).
    `swa_full=False` matches our backend (llama.cpp's C default is a full-size SWA cache).
    `cpu_features` (DeviceInfo's flag names: avx2, avx512f, neon, dotprod, i8mm) decides which
    matrices llama.cpp repacks into extra RAM; None reads this machine's flags.
    """
    if n_ctx <= 0 or n_parallel <= 0 or n_batch <= 0 or n_ubatch <= 0 or n_gpu_layers < 0:
        raise InvalidConfigError(
            f"n_ctx, n_parallel, n_batch and n_ubatch must be positive and n_gpu_layers not negative "
            f"(got n_ctx={n_ctx}, n_parallel={n_parallel}, n_batch={n_batch}, n_ubatch={n_ubatch}, "
            f"n_gpu_layers={n_gpu_layers})"
        )
    shape = _read_shape(header)
    k_size, v_size = _cache_type(type_k, "type_k"), _cache_type(type_v, "type_v")
    if not flash_attn and v_size[0] > 1:
        raise InvalidConfigError(f"a quantized V cache ({type_v}) needs flash attention",
                                 "turn flash attention on or use an f16 V cache")

    # llama.cpp's context geometry: cells per sequence padded to 256, batches capped by the context.
    cells = _pad(n_ctx, KV_PAD)
    n_tokens = min(n_ubatch, n_batch, cells * n_parallel)
    swa_cells = cells if swa_full else min(cells, _pad(shape.swa_window + n_tokens, KV_PAD))

    # llama.cpp counts the output head as layer n_layer and offloads from the top down.
    gpu_from = max(shape.n_layer + 1 - n_gpu_layers, 0)
    on_gpu = [il >= gpu_from for il in range(shape.n_layer + 1)]
    repack = _repacked_types(cpu_features)
    ram_weights, vram_weights = _weights(header, shape.n_layer, on_gpu, use_mmap, repack)

    ram_kv = vram_kv = 0
    for il in range(shape.n_layer):
        layer_cells = swa_cells if il in shape.swa_layers else cells
        k_row = _row_bytes(shape.heads_kv[il] * shape.key_length, k_size, type_k)
        v_row = _row_bytes(shape.heads_kv[il] * shape.value_length, v_size, type_v)
        layer = (k_row + v_row) * layer_cells * n_parallel
        if on_gpu[il]:
            vram_kv += layer
        else:
            ram_kv += layer

    graph = _graph_bytes(shape, n_tokens, cells, swa_cells, flash_attn)
    outputs = n_parallel * shape.n_vocab * BYTES_PER_LOGIT
    any_gpu, all_gpu = any(on_gpu), all(on_gpu[: shape.n_layer])
    # Each backend gets its own compute buffer sized for its share of the graph; with every
    # layer offloaded the CPU keeps only the input embeddings.
    ram_compute = (n_tokens * shape.n_embd * 4 if all_gpu and shape.n_layer else graph) + outputs
    # A GPU buffer is real memory once reserved, and llama.cpp reserves logits for a whole batch
    # (n_outputs_max defaults to n_batch); on the CPU those pages stay untouched.
    batch_logits = min(n_batch, cells * n_parallel) * shape.n_vocab * 4
    vram_compute = max(graph, batch_logits if on_gpu[shape.n_layer] else 0) if any_gpu else 0

    overhead = (
        IMPORT_BYTES
        + LOAD_BASE_BYTES
        + shape.n_vocab * BYTES_PER_TOKEN
        + shape.n_merges * BYTES_PER_MERGE
    )
    total = ram_weights + ram_kv + ram_compute + overhead
    return MemoryEstimate(
        weights_bytes=ram_weights,
        kv_bytes=ram_kv,
        compute_bytes=ram_compute,
        overhead_bytes=overhead,
        total_bytes=total,
        vram_bytes=vram_weights + vram_kv + vram_compute,
    )


def _pad(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _cache_type(name: str, what: str) -> tuple[int, int]:
    """(block size, bytes per block) of a KV cache type named as llama.cpp's --cache-type-k."""
    c = gguf_constants()
    member = c.GGMLQuantizationType.__members__.get(name.upper())
    if member is None or member not in c.GGML_QUANT_SIZES:
        known = "f32, f16, bf16, q8_0, q4_0, q4_1, iq4_nl, q5_0, q5_1"
        raise InvalidConfigError(f"unknown KV cache type {what}={name!r}", f"use one of {known}")
    return c.GGML_QUANT_SIZES[member]


def _row_bytes(n_values: int, size: tuple[int, int], name: str) -> int:
    block, type_size = size
    if n_values % block:
        raise InvalidConfigError(f"KV cache type {name} needs rows that are a multiple of {block} values, "
                                 f"this model's are {n_values}", "use f16 or q8_0")
    return n_values // block * type_size


def _read_shape(header: GGUFHeader) -> _Shape:
    n_layer = _int(header.arch_key("block_count"))
    if n_layer is None:  # fall back on the tensor names
        blocks = [int(m.group(1)) for t in header.tensors if (m := re.match(r"blk\.(\d+)\.", t.name))]
        n_layer = max(blocks) + 1 if blocks else 0
    n_embd = _int(header.arch_key("embedding_length")) or 0
    heads = _per_layer(header.arch_key("attention.head_count"), n_layer, 0)
    heads_kv = _per_layer(header.arch_key("attention.head_count_kv"), n_layer, None) or heads
    head_dim = n_embd // max(heads) if heads and max(heads) else 0
    n_ff = max(_per_layer(header.arch_key("feed_forward_length"), n_layer, 0) or (0,))
    n_expert_used = _int(header.arch_key("expert_used_count")) or 0
    if n_expert_used:  # MoE: the routed experts' activations side by side
        n_ff = max(n_ff, n_expert_used * (_int(header.arch_key("expert_feed_forward_length")) or n_ff))
    merges = header.get("tokenizer.ggml.merges")
    window = _int(header.arch_key("attention.sliding_window")) or 0
    return _Shape(
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_vocab=header.n_vocab or 0,
        n_merges=merges.length if isinstance(merges, GGUFArray) else 0,
        heads=heads or (0,) * n_layer,
        heads_kv=heads_kv or (0,) * n_layer,
        key_length=_int(header.arch_key("attention.key_length")) or head_dim,
        value_length=_int(header.arch_key("attention.value_length")) or head_dim,
        swa_window=window,
        swa_layers=_swa_layers(header, n_layer) if window > 0 else frozenset(),
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _per_layer(value: Any, n_layer: int, default: int | None) -> tuple[int, ...]:
    """A hyperparameter that GGUF stores either once or as one value per layer."""
    if isinstance(value, GGUFArray) and value.values is not None and len(value.values) >= n_layer:
        return tuple(int(v) for v in value.values[:n_layer])
    if _int(value) is not None:
        return (value,) * n_layer
    return () if default is None else (default,) * n_layer


def _swa_layers(header: GGUFHeader, n_layer: int) -> frozenset[int]:
    """Which layers use the sliding window: the file's own pattern, else llama.cpp's default."""
    pattern = header.arch_key("attention.sliding_window_pattern")
    if isinstance(pattern, GGUFArray) and pattern.values is not None:
        return frozenset(il for il, is_swa in enumerate(pattern.values[:n_layer]) if is_swa)
    period, dense_first = SWA_PATTERNS.get(header.architecture, (0, False))
    if _int(pattern) is not None:
        period = pattern
    if period == 0:  # a window without a known pattern: llama.cpp treats every layer as SWA
        return frozenset(range(n_layer))
    if dense_first:
        return frozenset(il for il in range(n_layer) if il % period != 0)
    return frozenset(il for il in range(n_layer) if il % period < period - 1)


def _graph_bytes(shape: _Shape, n_tokens: int, cells: int, swa_cells: int, flash_attn: bool) -> int:
    """Peak activations of one micro-batch as ggml's allocator lays them out, plus the masks.

    Fitted on llama.cpp's reserved compute buffer (with one output) over llama-style models of
    several widths: the feed-forward block holds about 3 n_ff + 4 n_embd floats per token;
    without flash attention the KQ matrix (heads x cells per token) usually dominates instead.
    Sized for the worst step, a full micro-batch with the whole context in the cache.
    """
    n_head = max(shape.heads, default=0)
    q_dim, kv_dim = n_head * shape.key_length, max(shape.heads_kv, default=0) * shape.key_length
    ffn = 3 * shape.n_ff + 4 * shape.n_embd
    attn = 0 if flash_attn else n_head * cells + 4 * shape.n_embd + 2 * (q_dim + kv_dim)
    # one mask per kind of layer present: full-context and sliding-window
    mask_cells = (cells if len(shape.swa_layers) < shape.n_layer else 0)
    mask_cells += swa_cells if shape.swa_layers else 0
    mask_bytes = mask_cells * n_tokens * (2 if flash_attn else 4)
    return n_tokens * 4 * max(ffn, attn) + mask_bytes


def _layer_of(tensor: GGUFTensor, n_layer: int) -> int:
    """The layer a tensor belongs to in llama.cpp's offload order (-1: input, n_layer: output)."""
    m = re.match(r"blk\.(\d+)\.", tensor.name)
    if m:
        return int(m.group(1))
    if tensor.name.startswith(("token_embd", "token_types", "position_embd")):
        return -1
    return n_layer  # output, output_norm and other head tensors


def _weights(
    header: GGUFHeader, n_layer: int, on_gpu: list[bool], use_mmap: bool, repack: frozenset[str]
) -> tuple[int, int]:
    """(RAM, VRAM) bytes of the weights as loaded."""
    vram = repacked = 0
    mapped: list[GGUFTensor] = []
    for t in header.tensors:
        layer = _layer_of(t, n_layer)
        if layer >= 0 and on_gpu[min(layer, n_layer)]:
            vram += t.n_bytes
        elif t.type_name in repack and len(t.shape) >= 2 and t.shape[1] % 8 == 0 and layer >= 0:
            repacked += t.n_bytes  # copied into llama.cpp's CPU_REPACK buffer
        else:
            mapped.append(t)
    if not mapped:
        return repacked, vram
    if not use_mmap:
        return sum(t.n_bytes for t in mapped) + repacked, vram
    # The mapping stays populated from the first to the last CPU tensor, gaps included; the
    # repacked tensors' pages inside that span stay resident too.
    span = max(t.offset + t.n_bytes for t in mapped) - min(t.offset for t in mapped)
    return span + repacked, vram


def _repacked_types(cpu_features: Collection[str] | None) -> frozenset[str]:
    """ggml types llama.cpp's CPU backend repacks (interleaves) on a CPU with these features."""
    flags = {f.lower() for f in (_host_cpu_features() if cpu_features is None else cpu_features)}
    types: set[str] = set()
    if "avx2" in flags:
        types |= {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    if any(f.startswith("avx512") for f in flags):
        types.add("Q2_K")
    if flags & {"neon", "asimd"} and "i8mm" in flags:
        types |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q1_0"}
    if flags & {"neon", "asimd"} and flags & {"dotprod", "asimddp"}:
        types |= {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "MXFP4", "Q8_0", "Q1_0"}
    return frozenset(types)


@functools.lru_cache(maxsize=1)
def _host_cpu_features() -> frozenset[str]:
    """This machine's CPU flags as llama.cpp's repack choice sees them (cheap, best effort)."""
    machine = platform.machine().lower()
    if platform.system() == "Darwin" and machine in ("arm64", "aarch64"):
        return frozenset({"neon", "dotprod"})  # every Apple M-series core has both
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip().lower() in ("flags", "features"):
                    flags = set(value.split())
                    if machine in ("aarch64", "arm64"):
                        flags.add("neon")
                    return frozenset(flags)
    except OSError:
        pass
    return frozenset({"neon"} if machine in ("aarch64", "arm64") else ())

