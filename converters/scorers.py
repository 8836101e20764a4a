"""Logits for quality measurement, from any artifact: a GGUF in llama.cpp, a .tflite, an ONNX folder.

A scorer decodes a ``Window`` of token ids from position 0 and yields, batch by batch, the target
tokens and the float32 logit rows of the scored positions (``first .. len-2``). Every format gets
the same token ids (the reference tokenizes the text once), so artifacts of one model compare
across formats; their batches differ in size, and ``RowQueue`` lines them up row by row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_runtime.errors import GenerationError, InvalidConfigError


@dataclass(frozen=True)
class Window:
    """Tokens decoded together from position 0; logits at ``first..len-2`` are scored."""

    tokens: tuple[int, ...]
    first: int


class Scorer(Protocol):
    path: str
    n_vocab: int
    add_bos: bool
    bos: int | None

    def tokenize(self, text: str) -> list[int]: ...

    def logit_batches(self, window: Window) -> Iterator[tuple[list[int], Any]]: ...

    def close(self) -> None: ...


# Most floats one decode batch may return (its logits are copied once): 128 MiB of float32.
_MAX_BATCH_FLOATS = 32 << 20


def open_scorer(path: str | Path, n_ctx: int, threads: int | None) -> Scorer:
    """The scorer for ``path``'s format (a .gguf, a .tflite or an ONNX folder)."""
    if Path(path).is_dir() or str(path).endswith(".tflite"):
        return BackendScorer(path, n_ctx, threads)
    return LlamaScorer(path, n_ctx, threads)


class LlamaScorer:
    """One GGUF loaded in llama.cpp with a context that returns logits for chosen positions.

    The model is loaded by the runtime's native layer (same checks, same log routing); the
    context is our own because it must return many logit rows per decode: llama.cpp's default
    context keeps one output per sequence (``n_outputs_max_per_seq = 1``).
    """

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None) -> None:
        import llama_cpp as c

        from edge_runtime.backends.base import Settings, default_threads
        from edge_runtime.backends.llamacpp import native
        from edge_runtime.errors import ModelLoadError
        from edge_runtime.formats.gguf import read_gguf_header

        read_gguf_header(path)  # our bounds-checked read first: llama.cpp aborts on some bad files
        self.path = str(path)
        self.model = native.NativeModel(self.path, Settings(n_ctx=n_ctx))
        self.n_vocab = native.vocab_size(self.model.vocab)
        self.add_bos = native.vocab_add_bos(self.model.vocab)
        self.bos = native.special_tokens(self.model.vocab)[0]
        self.n_batch = min(n_ctx, 512, max(32, _MAX_BATCH_FLOATS // max(1, self.n_vocab)))
        params = c.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = params.n_outputs_max = self.n_batch
        params.n_outputs_max_per_seq = 0  # = n_outputs_max: every scored position in a batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads or default_threads()
        params.flash_attn_type = c.LLAMA_FLASH_ATTN_TYPE_AUTO  # as llama-perplexity decides it
        params.no_perf = True
        native.take_recent_errors()
        self.ctx = c.llama_init_from_model(self.model.ptr, params)
        if not self.ctx:
            why = native.take_recent_errors() or "llama.cpp could not create a context"
            self.model.close()
            raise ModelLoadError(f"{self.path}: {why}", "try a smaller --ctx")
        self.memory = c.llama_get_memory(self.ctx)
        self.batch = c.llama_batch_init(self.n_batch, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """Tokens as llama-perplexity's ``common_tokenize(ctx, text, true)`` makes them."""
        return self.model.tokenize(text, add_special=True, parse_special=False)

    def logit_batches(self, window: Window) -> Iterator[tuple[list[int], Any]]:
        """For each decode batch: the target tokens and a float32 copy of their logit rows."""
        import llama_cpp as c
        import numpy as np

        tokens, last = window.tokens, len(window.tokens) - 2
        c.llama_memory_clear(self.memory, True)
        batch = self.batch
        for start in range(0, len(tokens), self.n_batch):
            end = min(start + self.n_batch, len(tokens))
            scored = []
            for i, p in enumerate(range(start, end)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[p], p, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = want = window.first <= p <= last
                if want:
                    scored.append(p)
            batch.n_tokens = end - start
            rc = c.llama_decode(self.ctx, batch)
            if rc != 0:
                raise GenerationError(f"llama.cpp could not evaluate {end - start} tokens (code {rc})")
            if not scored:
                continue
            rows = np.ctypeslib.as_array(c.llama_get_logits(self.ctx), shape=(len(scored), self.n_vocab))
            yield [tokens[p + 1] for p in scored], rows.copy()  # the next decode overwrites it

    def close(self) -> None:
        import llama_cpp as c

        if self.ctx:
            c.llama_batch_free(self.batch)
            c.llama_free(self.ctx)
            self.ctx = None
        self.model.close()


class BackendScorer:
    """A TFLite or ONNX artifact loaded by its runtime backend, asked for every position's logits."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None) -> None:
        from edge_runtime import load
        from edge_runtime.backends.base import Settings

        self.path = str(path)
        # One position more than a window: ONNX keeps one free for the next token.
        self.model = load(self.path, Settings(n_ctx=n_ctx + 1, n_threads=threads))
        info = self.model.info
        if info.n_ctx < n_ctx:
            self.close()
            raise InvalidConfigError(f"{Path(path).name} holds {info.n_ctx} positions; scoring needs {n_ctx}",
                                     f"use --ctx {info.n_ctx} or less")
        self.n_vocab = info.n_vocab
        self.add_bos = info.add_bos
        self.bos = self.model.tokenize("", add_bos=True)[0] if info.add_bos else None

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, add_bos=self.add_bos)

    def logit_batches(self, window: Window) -> Iterator[tuple[list[int], Any]]:
        tokens, last = window.tokens, len(window.tokens) - 2
        for pos, rows in self.model.logit_rows(tokens[: last + 1], window.first):
            yield [tokens[p + 1] for p in range(pos, pos + len(rows))], rows

    def close(self) -> None:
        self.model.close()


class RowQueue:
    """A scorer's batches as a queue of rows, taken in whatever counts another scorer's batches have."""

    def __init__(self, batches: Iterator[tuple[list[int], Any]]) -> None:
        self._batches = batches
        self._targets: list[int] = []
        self._rows: list[Any] = []
        self._held = 0

    def take(self, n: int) -> tuple[list[int], Any]:
        import numpy as np

        while self._held < n:
            try:
                targets, rows = next(self._batches)
            except StopIteration:
                raise GenerationError("internal error: a scorer returned fewer positions than the reference") from None
            self._targets += targets
            self._rows.append(rows)
            self._held += len(targets)
        rows = self._rows[0] if len(self._rows) == 1 else np.concatenate(self._rows)
        targets, self._targets = self._targets[:n], self._targets[n:]
        self._rows, self._held = ([rows[n:]] if len(rows) > n else []), self._held - n
        return targets, rows[:n]
