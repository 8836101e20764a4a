"""Logits for quality measurement, from any artifact: a GGUF in llama.cpp, a .tflite, an ONNX folder.

A ``Scorer`` is an artifact loaded by its runtime backend and asked, through the ``Model``
protocol's ``logit_rows``, for the logits of every scored position of a ``Window`` of token ids
decoded from position 0; it yields them batch by batch with their target tokens. Every format
gets the same token ids (the reference tokenizes the text once), so artifacts of one model compare
across formats; their batches differ in size, and ``RowQueue`` lines them up row by row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import GenerationError, InvalidConfigError


@dataclass(frozen=True)
class Window:
    """Tokens decoded together from position 0; logits at ``first..len-2`` are scored."""

    tokens: tuple[int, ...]
    first: int


class Scorer:
    """One artifact loaded by its backend (the format decides which), scoring windows."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None, kv_type: str = "f16") -> None:
        """``kv_type``: the KV cache type of the scoring context (llama.cpp's ``type_k``/``type_v``)."""
        from edge_runtime.backends import load_artifact
        from edge_runtime.backends.base import Settings
        from edge_runtime.models.spec import describe_artifact

        self.path = str(path)
        # One position more than a window: a prompt leaves one free for the next token.
        settings = Settings(n_ctx=n_ctx + 1, n_threads=threads, type_k=kv_type, type_v=kv_type)
        self.model = load_artifact([describe_artifact(Path(path))], settings)
        info = self.model.info
        if info.n_ctx < n_ctx:
            self.close()
            raise InvalidConfigError(f"{Path(path).name} holds {info.n_ctx} positions; scoring needs {n_ctx}",
                                     f"use --ctx {info.n_ctx} or less")
        self.n_vocab = info.n_vocab
        self.add_bos = info.add_bos
        self.bos = self.model.tokenize("", add_bos=True)[0] if info.add_bos else None

    def tokenize(self, text: str) -> list[int]:
        """Tokens as llama-perplexity's ``common_tokenize(ctx, text, true)`` makes them."""
        return self.model.tokenize(text, add_bos=True)

    def logit_batches(self, window: Window) -> Iterator[tuple[list[int], Any]]:
        """For each batch the backend evaluates: the target tokens and their float32 logit rows."""
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
