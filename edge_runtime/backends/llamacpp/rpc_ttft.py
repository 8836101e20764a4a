"""What the RPC hop adds to the time to first token: the same prompt, split across workers and local.

For the bench's latency anatomy (``anatomy.transfer.rpc_ttft_ms``): ``rpc_ttft_ms`` loads the
model twice, on this machine alone and split as ``settings`` says, times one-token greedy
generations of the same prompt from an empty cache on each, alternating, and returns the
difference of the medians. What remains is the network and the workers' share of the prefill.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import replace

from edge_runtime.backends.base import Settings, first_token_s
from edge_runtime.errors import InvalidConfigError


def rpc_ttft_ms(path: str, settings: Settings, tokens: Sequence[int], reps: int = 3) -> float:
    """Median TTFT split across ``settings.rpc_servers`` minus median TTFT on this machine, in ms.

    Negative when the split is not measurably slower (noise, or workers faster than this CPU).
    """
    from edge_runtime.backends.llamacpp import LlamaCppBackend

    if not settings.rpc_servers:
        raise InvalidConfigError("rpc_ttft_ms needs settings that name workers (rpc_servers)")
    local_settings = replace(settings, rpc_servers=(), tensor_split=(), n_gpu_layers=0, n_parallel=1)
    prompt = list(tokens)
    with LlamaCppBackend.load(path, replace(settings, n_parallel=1)) as split, \
            LlamaCppBackend.load(path, local_settings) as local:
        first_token_s(split, prompt), first_token_s(local, prompt)  # warm-up: first-touch costs on both sides
        split_s, local_s = [], []
        for _ in range(max(1, reps)):
            split_s.append(first_token_s(split, prompt))
            local_s.append(first_token_s(local, prompt))
    return (statistics.median(split_s) - statistics.median(local_s)) * 1000.0
