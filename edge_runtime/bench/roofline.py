"""The decode roofline: how fast decoding could be if it only waited on memory.

Decoding one token reads every weight the token touches once, plus the KV cache up to its
position. On CPUs and small SoCs that traffic, not arithmetic, bounds the speed, so
``measured read bandwidth / bytes read per token`` is the ceiling, and ``decode tok/s ÷ ceiling``
says how much of the memory system a runtime uses (llama.cpp typically reaches 50-80 %).

Bandwidth: a multi-threaded ``np.add.reduce`` (sum) over a float64 buffer far larger than the
caches, best of several passes. A sum reads each byte once and writes nothing; a copy would
also write, and write-allocate traffic makes a copy count two to three times the bytes it is
credited with. float64 keeps the arithmetic per byte low (one add per 8 bytes) so the sum waits
on DRAM, not the ALUs. numpy releases the GIL inside the reduction, so one thread per decode
thread reads in parallel, as llama.cpp's threads do. The buffer is written before it is read:
a fresh ``np.empty`` maps the kernel's shared zero page, which lives in cache and would report
fantasy figures. BLAS thread settings (OPENBLAS_*, MKL_*) play no part: a sum is not BLAS.

Bytes per token: every tensor of the file except the row-lookup tables (token and position
embeddings: one row per token); when the model ties its output head to the token embeddings
(no ``output.weight``), that matrix is read whole as the head. Mixture-of-experts tensors
(``*_exps``) count only the used share of experts. Plus K and V rows of every cached position
at the mean context position of the decode run (sliding-window layers at most their window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from edge_runtime.formats.gguf_header import GGUFHeader

MIB = 1 << 20
DEFAULT_BANDWIDTH_BUFFER = 512 * MIB
MIN_BANDWIDTH_BUFFER = 32 * MIB
_ROW_LOOKUP_TENSORS = ("token_embd.weight", "token_types.weight", "position_embd.weight")


@dataclass(frozen=True)
class BandwidthMeasurement:
    """Memory read bandwidth of this machine, as the roofline uses it."""

    bytes_s: float  # best pass
    buffer_bytes: int
    passes: int
    threads: int
    samples_bytes_s: tuple[float, ...]
    method: str = "numpy float64 np.add.reduce over a written buffer, one slice per thread, best pass"

    @property
    def gbs(self) -> float:
        """Decimal gigabytes per second (10^9 bytes), as vendors quote bandwidth."""
        return self.bytes_s / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "samples_bytes_s": list(self.samples_bytes_s), "gbs": self.gbs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BandwidthMeasurement:
        return cls(
            bytes_s=float(data["bytes_s"]), buffer_bytes=int(data["buffer_bytes"]),
            passes=int(data["passes"]), threads=int(data["threads"]),
            samples_bytes_s=tuple(float(x) for x in data.get("samples_bytes_s") or ()),
            method=str(data.get("method") or cls.method),
        )


def bandwidth_buffer_bytes(available_bytes: int | None, wanted: int = DEFAULT_BANDWIDTH_BUFFER) -> int:
    """The buffer size to measure with: ``wanted``, but at most a quarter of available RAM."""
    if available_bytes:
        wanted = min(wanted, available_bytes // 4)
    return max(MIN_BANDWIDTH_BUFFER, wanted)


def measure_bandwidth(buffer_bytes: int = DEFAULT_BANDWIDTH_BUFFER, threads: int = 1,
                      passes: int = 5) -> BandwidthMeasurement:
    """Read bandwidth in bytes/s: the best of ``passes`` sums over ``buffer_bytes`` of float64."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = max(1, threads)
    n = max(1, buffer_bytes // 8)
    buffer = np.ones(n, dtype=np.float64)  # written, so every page is real memory
    slices = np.array_split(buffer, threads)
    samples: list[float] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(np.add.reduce, slices))  # warm-up: fault in thread stacks, page tables
        for _ in range(max(1, passes)):
            start = time.perf_counter()
            list(pool.map(np.add.reduce, slices))
            elapsed = time.perf_counter() - start
            if elapsed > 0:
                samples.append(buffer.nbytes / elapsed)
    del buffer, slices
    return BandwidthMeasurement(
        bytes_s=max(samples) if samples else 0.0, buffer_bytes=n * 8, passes=max(1, passes),
        threads=threads, samples_bytes_s=tuple(samples),
    )


@dataclass(frozen=True)
class TokenTraffic:
    """Bytes one decode step reads from memory."""

    weights_bytes: int
    kv_bytes: int
    context_position: float  # the mean position the KV figure is taken at

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes


def weights_read_per_token(header: GGUFHeader) -> int:
    """Weight bytes one token reads (row lookups excluded, a tied head counted, MoE share)."""
    names = {t.name for t in header.tensors}
    tied = "output.weight" not in names
    n_expert = _int(header.arch_key("expert_count"))
    n_used = _int(header.arch_key("expert_used_count"))
    total = 0
    for t in header.tensors:
        if t.name in _ROW_LOOKUP_TENSORS:
            rows = t.shape[1] if len(t.shape) > 1 and t.shape[1] else 1
            # One row per token, and the whole matrix again when it doubles as the output head.
            total += t.n_bytes // rows
            if tied and t.name == "token_embd.weight":
                total += t.n_bytes
            continue
        if "_exps." in t.name and n_expert and n_used:
            total += t.n_bytes * n_used // n_expert
            continue
        total += t.n_bytes
    return total


def kv_read_per_token(header: GGUFHeader, position: float, type_k: str = "f16", type_v: str = "f16") -> int:
    """K and V bytes one decode step reads at context ``position`` (SWA layers capped)."""
    # memory.py owns the model's KV geometry; the roofline reads the same shape it estimates with.
    from edge_runtime.planning.memory import _cache_type, _read_shape, _row_bytes

    shape = _read_shape(header)
    k_size, v_size = _cache_type(type_k, "type_k"), _cache_type(type_v, "type_v")
    total = 0.0
    for il in range(shape.n_layer):
        cells = position
        if il in shape.swa_layers and shape.swa_window > 0:
            cells = min(position, float(shape.swa_window))
        k_row = _row_bytes(shape.heads_kv[il] * shape.key_length, k_size, type_k)
        v_row = _row_bytes(shape.heads_kv[il] * shape.value_length, v_size, type_v)
        total += (k_row + v_row) * cells
    return int(total)


def token_traffic(header: GGUFHeader, position: float, type_k: str = "f16", type_v: str = "f16") -> TokenTraffic:
    """Weights plus KV bytes per decode step at the mean context ``position``."""
    return TokenTraffic(
        weights_bytes=weights_read_per_token(header),
        kv_bytes=kv_read_per_token(header, position, type_k, type_v),
        context_position=position,
    )


@dataclass(frozen=True)
class Roofline:
    """The decode ceiling of one artifact on one device, and how close the measurement came."""

    bandwidth_bytes_s: float
    bytes_per_token: int
    weights_bytes_per_token: int
    kv_bytes_per_token: int
    context_position: float
    ceiling_tok_s: float
    efficiency: float | None  # measured decode tok/s ÷ ceiling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Roofline:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def roofline(bandwidth_bytes_s: float, traffic: TokenTraffic, decode_tok_s: float | None) -> Roofline:
    """The ceiling ``bandwidth / bytes per token`` and the efficiency of ``decode_tok_s``."""
    per_token = traffic.total_bytes
    ceiling = bandwidth_bytes_s / per_token if per_token > 0 else math.inf
    efficiency = None
    if decode_tok_s is not None and math.isfinite(ceiling) and ceiling > 0:
        efficiency = decode_tok_s / ceiling
    return Roofline(
        bandwidth_bytes_s=bandwidth_bytes_s, bytes_per_token=per_token,
        weights_bytes_per_token=traffic.weights_bytes, kv_bytes_per_token=traffic.kv_bytes,
        context_position=traffic.context_position, ceiling_tok_s=ceiling, efficiency=efficiency,
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
