"""Token sampling over one row of logits in numpy, for runtimes that hand logits to Python.

The chain and its semantics follow llama.cpp's sampler chain as the llama.cpp backend builds it
(``_llama_native.Sampler``): repetition penalty, then greedy when ``temperature <= 0``; otherwise
top-k, top-p, min-p (each on the untempered distribution, keeping at least one token), then the
temperature and a draw. Everything after top-k works on the few surviving candidates, so a step
costs one ``argpartition`` over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_runtime.backends.base import SamplingParams


def new_rng(params: SamplingParams) -> np.random.Generator:
    """The random source of one generation: seeded when ``params.seed`` is set."""
    return np.random.default_rng(params.seed)


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int) -> np.ndarray:
    """llama.cpp's penalty: each recent token's logit divided (positive) or multiplied (negative)."""
    if penalty == 1.0 or not history or last_n == 0:
        return logits
    recent = history[-last_n:] if last_n > 0 else history
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    out = logits.astype(np.float32, copy=True)
    values = out[ids]
    out[ids] = np.where(values > 0, values / penalty, values * penalty)
    return out


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


def sample_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
                 history: Sequence[int] = ()) -> int:
    """Pick the next token id from ``logits`` (shape [n_vocab]) as ``params`` say."""
    logits = apply_repeat_penalty(logits, history, params.repeat_penalty, params.repeat_last_n)
    if params.greedy:
        return int(np.argmax(logits))
    n_vocab = logits.shape[0]
    if 0 < params.top_k < n_vocab:
        ids = np.argpartition(logits, n_vocab - params.top_k)[n_vocab - params.top_k:]
    else:
        ids = np.arange(n_vocab)
    values = logits[ids].astype(np.float64)
    order = np.argsort(-values, kind="stable")
    ids, values = ids[order], values[order]
    if params.top_p < 1.0:
        cumulative = np.cumsum(_softmax(values))
        keep = int(np.searchsorted(cumulative, params.top_p)) + 1
        ids, values = ids[:keep], values[:keep]
    if params.min_p > 0.0:
        # p >= min_p * p_max, in logit space: the candidates are sorted, values[0] is the max.
        keep = max(1, int(np.count_nonzero(values >= values[0] + np.log(params.min_p))))
        ids, values = ids[:keep], values[:keep]
    probs = _softmax(values / params.temperature)
    pick = int(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"))
    return int(ids[min(pick, len(ids) - 1)])
