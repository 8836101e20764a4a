"""A model split across llama.cpp RPC workers: what each may hold, the split, and the layers each gets.

The planner treats the workers together as one place to offload layers to (as it would a GPU):
as many layers as their memory holds go to them, shared in proportion to what each may hold
(``tensor_split``), the rest stay on this machine's CPU. ``layer_counts`` follows llama.cpp's
own assignment (``llama_model::load_tensors``), so the plan shows the layers where they will be.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_runtime.backends.llamacpp.rpc import WorkerDevice

MIB = 1 << 20
# Left free on a worker whose device reports real free memory (a GPU): its driver and programs.
WORKER_RESERVE_BYTES = 512 * MIB
# ggml's CPU device reports all of RAM as free; of that, a plan uses at most this share.
CPU_WORKER_SHARE = 0.75


@dataclass(frozen=True)
class WorkerShare:
    """One worker device in a plan: its memory, what the plan may use of it, the layers it gets."""

    endpoint: str
    device: str
    free_bytes: int
    total_bytes: int
    usable_bytes: int
    layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_bytes(device: WorkerDevice) -> int:
    """Memory of a worker device the plan may fill (see the module's constants)."""
    if device.free_bytes >= device.total_bytes:  # "all free": a CPU worker, its RAM not really all free
        return int(device.total_bytes * CPU_WORKER_SHARE)
    return max(0, device.free_bytes - WORKER_RESERVE_BYTES)


def split_over(devices: Sequence[WorkerDevice]) -> tuple[float, ...]:
    """``tensor_split``: each device's share, as the GiB it may hold (llama.cpp normalizes them)."""
    return tuple(round(usable_bytes(d) / (1 << 30), 3) for d in devices)


def layer_counts(n_layer: int, gpu_layers: int, split: Sequence[float]) -> tuple[int, list[int]]:
    """(layers on this CPU, layers per device) for ``n_layer`` blocks plus the output layer.

    llama.cpp offloads the last ``gpu_layers`` of them; layer ``i`` of those goes to the first
    device whose cumulative share exceeds ``i / gpu_layers``.
    """
    total = n_layer + 1
    offloaded = min(gpu_layers, total)
    counts = [0] * len(split)
    if not split or offloaded <= 0 or sum(split) <= 0:
        return total, counts
    running, bounds = 0.0, []
    for share in split:
        running += share
        bounds.append(running / sum(split))
    for i in range(offloaded):
        counts[min(bisect.bisect_right(bounds, i / offloaded), len(split) - 1)] += 1
    return total - offloaded, counts


def worker_shares(devices: Sequence[WorkerDevice], n_layer: int, gpu_layers: int) -> tuple[WorkerShare, ...]:
    """Each device with its memory, what the plan may use of it and the layers it gets."""
    _, counts = layer_counts(n_layer, gpu_layers, split_over(devices))
    return tuple(WorkerShare(d.endpoint, d.name, d.free_bytes, d.total_bytes, usable_bytes(d), n)
                 for d, n in zip(devices, counts, strict=True))
