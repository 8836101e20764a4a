"""Token sampling over rows of logits in numpy, for the runtimes that hand logits to Python.

One ``Sampler`` per generation, used by ONNX and TFLite alike: the same logits, parameters and
seed give the same tokens whichever of them calls it. The chain follows llama.cpp's as the
llama.cpp backend builds it (``llamacpp.sampler.Sampler``): the grammar's mask, ``logit_bias``,
the penalties (repetition, frequency, presence) on the whole row, then greedy when
``temperature == 0``; otherwise top-k, top-p, min-p (each on the untempered distribution,
keeping at least one token), the temperature and one draw.

Under a grammar the candidates are the allowed ids (``np.flatnonzero`` of the mask), never an
``argpartition`` of a row that is mostly ``-inf``: its many ties make that twenty times slower.

``token_logprobs`` is the one definition of a token's log-probability every backend reports: the
log-softmax of the model's raw logits, before the grammar, the bias, the penalties and the
temperature (OpenAI's choice), so it compares across sampling settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.backends.params import SamplingParams
from edge_runtime.errors import GenerationError

if TYPE_CHECKING:
    from edge_runtime.backends.constraints import GrammarState


class Sampler:
    """Picks tokens for one generation as ``params`` say, from a generator seeded by ``params.seed``."""

    def __init__(self, params: SamplingParams, grammar: GrammarState | None = None) -> None:
        self.params = params
        self._grammar = grammar
        self._rng = np.random.default_rng(params.seed)
        bias = params.logit_bias or {}
        self._bias_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def pick(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """The next token from ``logits`` (shape [n_vocab]); ``history`` (prompt and generated
        tokens so far) feeds the penalties. Under a grammar, its next mask is computed first."""
        ids, probs = self.distribution(logits, history)
        if self.params.greedy:
            return int(ids[0])
        # One uniform number per token, inverted through the cumulative distribution.
        pick = int(np.searchsorted(np.cumsum(probs), self._rng.random(), side="right"))
        return int(ids[min(pick, len(ids) - 1)])

    def advance(self, token: int) -> bool:
        """Record the chosen ``token`` with the grammar (not an end token: that ends the answer);
        True when the grammar is then complete and the answer must stop."""
        if self._grammar is None:
            return False
        self._grammar.consume(token)
        return self._grammar.stopped

    def logprobs(self, logits: np.ndarray, token: int) -> tuple[float | None, tuple[tuple[int, float], ...]]:
        """``token_logprobs`` as ``params.logprobs`` asks (None and nothing when it is off)."""
        if self.params.logprobs is None:
            return None, ()
        return token_logprobs(logits, token, self.params.logprobs)

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The tokens the draw chooses among, most likely first, and their probabilities (the
        whole chain but the draw; greedy: the best token with probability 1)."""
        allowed = self._allowed(logits.shape[0])
        logits = self._penalize(logits, history)
        if self.params.greedy:
            if allowed is None:
                return np.array([int(np.argmax(logits))]), np.ones(1)
            return np.array([int(allowed[np.argmax(logits[allowed])])]), np.ones(1)
        ids, values = self._candidates(logits, allowed)
        ids, values = self._truncate(ids, values)
        return ids, _softmax(values / self.params.temperature)

    def _allowed(self, n_vocab: int) -> np.ndarray | None:
        """The ids the grammar allows next, ascending (None without a grammar)."""
        if self._grammar is None:
            return None
        self._grammar.fill()
        ids = np.flatnonzero(self._grammar.allowed()[:n_vocab])
        if not len(ids):
            why = self._grammar.matcher.get_error() or "no reason given"
            raise GenerationError(f"the grammar allows no next token ({why})")
        return ids

    def _penalize(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """``logit_bias``, then llama.cpp's penalties: each distinct token among the last
        ``repeat_last_n`` has its logit divided (when positive) or multiplied (when not) by
        ``repeat_penalty``, then lowered by ``frequency_penalty`` per occurrence and
        ``presence_penalty`` once. The row is copied only when something changes it."""
        p = self.params
        out = logits
        if len(self._bias_ids):
            out = logits.astype(np.float32, copy=True)
            inside = self._bias_ids < out.shape[0]
            out[self._bias_ids[inside]] += self._bias_values[inside]
        if not p.penalized or not history:
            return out
        recent = history if p.repeat_last_n < 0 else history[-p.repeat_last_n:]
        ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
        inside = (ids >= 0) & (ids < out.shape[0])
        ids, counts = ids[inside], counts[inside]
        if out is logits:
            out = logits.astype(np.float32, copy=True)
        seen = out[ids]
        if p.repeat_penalty != 1.0:
            seen = np.where(seen > 0, seen / p.repeat_penalty, seen * p.repeat_penalty)
        out[ids] = seen - (counts * p.frequency_penalty + p.presence_penalty)
        return out

    def _candidates(self, logits: np.ndarray, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids among ``allowed`` (every id when None; all of them when ``top_k <= 0``) and
        their logits in float64, best first."""
        pool = np.arange(logits.shape[0]) if allowed is None else allowed
        top_k = self.params.top_k
        if 0 < top_k < len(pool):
            values = logits if allowed is None else logits[pool]
            ids = pool[np.argpartition(values, len(pool) - top_k)[len(pool) - top_k:]]
        else:
            ids = pool
        values = logits[ids].astype(np.float64)
        order = np.argsort(-values, kind="stable")
        return ids[order], values[order]

    def _truncate(self, ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top-p then min-p on sorted candidates, as llama.cpp's samplers (at least one kept)."""
        p = self.params
        if p.top_p < 1.0:
            # The fewest best tokens whose probabilities reach top_p, the one that crosses it included.
            keep = int(np.searchsorted(np.cumsum(_softmax(values)), p.top_p)) + 1
            ids, values = ids[:keep], values[:keep]
        if p.min_p > 0.0:
            # p >= min_p * p_max, in logit space: values[0] is the maximum.
            keep = max(1, int(np.count_nonzero(values >= values[0] + np.log(p.min_p))))
            ids, values = ids[:keep], values[:keep]
        return ids, values


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The log-probability of ``token`` and the ``top`` most likely tokens with theirs, best first
    (ties by id), from the log-softmax of the raw ``logits`` row."""
    row = np.asarray(logits, dtype=np.float64)
    shift = row.max()
    log_total = shift + np.log(np.exp(row - shift).sum())
    chosen = float(row[token] - log_total)
    if top <= 0:
        return chosen, ()
    best = np.argpartition(-row, top - 1)[:top] if top < len(row) else np.arange(len(row))
    best = best[np.lexsort((best, -row[best]))]
    return chosen, tuple((int(t), float(row[t] - log_total)) for t in best)


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()
