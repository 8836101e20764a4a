"""llama.cpp's own sampler chain for one generation, with a grammar's mask as its first link.

The chain is native: no logits row is copied into Python for an unconstrained request without
logprobs (plain greedy takes the argmax of the row in place). Its links, in llama.cpp's order:
the grammar's mask (``MaskSampler``, only under a grammar), ``logit_bias``, the penalties
(repetition, frequency and presence in one sampler), then greedy, or top-k, top-p, min-p, the
temperature and a seeded draw. ``backends.sampling`` runs the same chain in numpy for the other
backends.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import TYPE_CHECKING

import llama_cpp as _c
import numpy as np

from edge_runtime.backends.params import SamplingParams

if TYPE_CHECKING:
    from edge_runtime.backends.constraints import GrammarState
    from edge_runtime.backends.llamacpp.native import NativeContext

_MASK_NAME = b"edgert-grammar"


@_c.llama_sampler_i_name
def _mask_name(_smpl: object) -> bytes:
    return _MASK_NAME  # a module constant: the pointer handed to C stays valid


class MaskSampler:
    """A ``llama_sampler`` written in Python: only the tokens the grammar's last mask allows stay.

    First in the chain, so every later link sees only legal candidates. ``accept`` stays NULL:
    the prompt tokens fed to the chain for the penalties must not reach the grammar (the
    scheduler advances the matcher itself). Once added to a chain, the chain frees the C
    sampler; this object keeps the callback and the interface struct alive until then.
    """

    def __init__(self, grammar: GrammarState) -> None:
        self._grammar = grammar
        self._apply_callback = _c.llama_sampler_i_apply(self._apply)
        iface = _c.llama_sampler_i()
        iface.name = _mask_name
        iface.apply = self._apply_callback
        self._iface = iface  # the C sampler points at it
        self.ptr = _c.llama_sampler_init(ctypes.byref(iface), None)

    def _apply(self, _smpl: object, cur_p: object) -> None:
        candidates = cur_p.contents  # type: ignore[attr-defined]
        size = candidates.size
        # llama_token_data[size] as int32[size, 3] (id, logit bits, p bits): a plain 2-D view is
        # many times faster to gather and scatter than a structured dtype.
        address = ctypes.cast(candidates.data, ctypes.c_void_p).value
        rows = np.frombuffer((ctypes.c_int32 * (3 * size)).from_address(address), dtype=np.int32).reshape(size, 3)
        allowed = self._grammar.allowed()
        if size == len(allowed) and rows[0, 0] == 0 and rows[-1, 0] == size - 1:
            keep = allowed  # first in the chain: candidate i is token i
        else:
            keep = allowed[rows[:, 0]]
        n_keep = int(np.count_nonzero(keep))
        if n_keep == 0:
            return  # a matcher in error: the scheduler's consume reports it
        if n_keep * 4 < size:
            # Few allowed (a number, a key): move them to the front and shrink the array, as
            # top-k does; the rest of the chain then works on a handful of candidates.
            rows[:n_keep] = rows[np.flatnonzero(keep)]
            candidates.size = n_keep
            candidates.sorted = False
        else:
            # Most allowed (inside a string): moving 48k rows costs more than masking them.
            rows.view(np.float32)[:, 1][~keep] = -np.inf


class Sampler:
    """The chain for one generation (``n_ctx`` bounds a ``repeat_last_n`` of -1: every token).

    Plain greedy decoding (no grammar, bias or penalty) skips the chain: llama.cpp's would copy
    the whole vocabulary into a candidate array each token only to take its maximum, which costs
    several times an argmax over the logits row in place (the same token: both take the first
    maximum, and NaN rows are resolved as llama.cpp's strict comparison resolves them).
    """

    def __init__(self, params: SamplingParams, n_vocab: int, n_ctx: int, grammar: GrammarState | None = None) -> None:
        self.n_vocab = n_vocab
        self.argmax_only = params.greedy and grammar is None and not params.logit_bias and not params.penalized
        self.history_window = n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
        self.uses_history = params.penalized
        self._mask: MaskSampler | None = None
        self.ptr = None
        if not self.argmax_only:
            self.ptr = self._chain(params, n_vocab, grammar)

    def _chain(self, params: SamplingParams, n_vocab: int, grammar: GrammarState | None) -> object:
        chain = _c.llama_sampler_chain_init(_c.llama_sampler_chain_default_params())
        add = _c.llama_sampler_chain_add
        self._mask = MaskSampler(grammar) if grammar is not None else None
        if self._mask is not None:
            add(chain, self._mask.ptr)
        if params.logit_bias:
            entries = (_c.llama_logit_bias * len(params.logit_bias))(
                *(_c.llama_logit_bias(t, b) for t, b in params.logit_bias.items()))
            add(chain, _c.llama_sampler_init_logit_bias(n_vocab, len(entries), entries))  # llama.cpp copies them
        if params.penalized:
            add(chain, _c.llama_sampler_init_penalties(n_vocab, self.history_window, params.repeat_penalty,
                                                       params.frequency_penalty, params.presence_penalty))
        if params.greedy:
            add(chain, _c.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, _c.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(chain, _c.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(chain, _c.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, _c.llama_sampler_init_temp(params.temperature))
            add(chain, _c.llama_sampler_init_dist(_c.LLAMA_DEFAULT_SEED if params.seed is None else params.seed))
        return chain

    def accept_prompt(self, tokens: Sequence[int]) -> None:
        """Feed the penalties the prompt's last tokens (the grammar never sees them)."""
        for t in tokens[-self.history_window:] if self.history_window > 0 else ():
            _c.llama_sampler_accept(self.ptr, t)

    def sample(self, ctx: NativeContext, index: int) -> int:
        """The token for batch row ``index`` of the last decode (the chain records it)."""
        if self.argmax_only:
            row = ctx.logits_row(index, self.n_vocab)
            token = int(row.argmax())
            if row[token] != row[token]:  # NaN: llama.cpp's greedy keeps index 0 unless a number beats it
                token = 0 if row[0] != row[0] else int(np.nanargmax(row))
            return token
        return int(_c.llama_sampler_sample(self.ptr, ctx.ptr, index))

    def close(self) -> None:
        if self.ptr:
            _c.llama_sampler_free(self.ptr)  # frees the mask sampler with the chain
            self.ptr = None
        self._mask = None
