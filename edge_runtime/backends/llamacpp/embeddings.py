"""Text embeddings from any GGUF llama.cpp can pool: a context with embeddings on, several inputs a decode.

The pooling is the model's own (the GGUF's ``<arch>.pooling_type``: mean, CLS or last token); a
model that names none (a chat model such as SmolLM2) is mean-pooled. Each vector is L2-normalised,
as OpenAI's and Ollama's are. Inputs go into one ``llama_decode`` each as their own sequence (ids
``0..n``, positions from 0) while their tokens fit the batch, up to ``SEQUENCES_PER_DECODE`` inputs;
a batch holds the whole context, so an input that fits the context is never split across two
micro-batches (llama.cpp pools per micro-batch). An input's vector does not depend on what else
shares its decode, to rounding: where its tokens sit in the shared cache changes the order of
some sums, which in a quantized model may round an activation one step the other way (then by
up to ~3e-3 per number, cosine > 0.9999). The engine either loads its own ``llama_model`` or
shares a chat model's (``LlamaCppModel.native_model``), beside the chat context; then its context
gets half the threads (at least one), so that its decodes and the chat scheduler's, which run at
the same time, do not each try to use every core of a small board.

Memory: a model with an output head (a chat model) computes its vocabulary's logits for every
token of a decode, as llama.cpp does with embeddings on: about ``n_ctx × n_vocab × 8`` bytes at
the peak, and without flash attention the attention scores take ``n_ctx² × n_head × 4``, so the
embedding context stays modest (``cli.embed.EMBEDDING_CTX`` by default; ``cli.embed`` estimates it).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import llama_cpp as _c
import numpy as np

from edge_runtime.backends.base import Embeddings, ModelInfo, Settings, default_threads
from edge_runtime.backends.llamacpp import native
from edge_runtime.backends.llamacpp.model import describe
from edge_runtime.errors import ContextLengthExceededError, GenerationError, InvalidRequestError, UnsupportedModelError

SEQUENCES_PER_DECODE = 32
_POOLING_NAMES = {_c.LLAMA_POOLING_TYPE_MEAN: "mean", _c.LLAMA_POOLING_TYPE_CLS: "cls",
                  _c.LLAMA_POOLING_TYPE_LAST: "last"}


class InputTooLongError(ContextLengthExceededError):
    """One input of an embedding request that does not fit the embedding context."""

    def __init__(self, index: int, n_tokens: int, n_ctx: int) -> None:
        super().__init__(n_tokens, n_ctx, "shorten that input or split it in pieces")
        self.message = f"input {index} is {n_tokens} tokens but the embedding context holds {n_ctx}"
        self.args = (self.message,)
        self.index = index


class LlamaCppEmbedder:
    """Embeddings of texts or token lists from a GGUF model (``backends.base.Embedder``)."""

    def __init__(self, path: str, settings: Settings, *, shared: native.NativeModel | None = None) -> None:
        """Load ``path`` (or, with ``shared``, use that loaded model of the same file) and make the context.

        ``settings.n_ctx`` bounds each input (0: the model's training context; above it: capped).
        """
        self.path = str(path)
        self._owned = shared is None
        self.native_model = native.NativeModel(self.path, settings) if shared is None else shared
        try:
            self.pooling = self._pooling_type()
            n_ctx_train = int(_c.llama_model_n_ctx_train(self.native_model.ptr))
            self.n_ctx = min(settings.n_ctx, n_ctx_train) if settings.n_ctx > 0 else n_ctx_train
            self.n_embd = int(_c.llama_model_n_embd_out(self.native_model.ptr))
            self.n_vocab = native.vocab_size(self.native_model.vocab)
            self.info = self._info()
            threads = settings.n_threads or default_threads()
            if shared is not None:  # the chat scheduler decodes on the same cores meanwhile
                threads = max(1, threads // 2)
            self.n_threads = threads
            self._context = _EmbeddingContext(self.native_model, self.n_ctx, self.pooling, threads, threads)
        except BaseException:
            if self._owned:
                self.native_model.close()
            raise
        self._lock = threading.Lock()  # one context: one decode at a time

    def _info(self) -> ModelInfo:
        """What the model says about itself, as a chat model's ``info`` (Ollama's /api/tags and /api/show)."""
        from edge_runtime.formats.gguf import read_gguf_header

        return describe(self.native_model, read_gguf_header(self.path), self.path, self.n_ctx, chat_template=None)

    @property
    def pooling_name(self) -> str:
        return _POOLING_NAMES[self.pooling]

    def _pooling_type(self) -> int:
        """The GGUF's pooling type; mean where it names none (or none at all)."""
        model = self.native_model
        arch = model.meta("general.architecture") or ""
        raw = model.meta(f"{arch}.pooling_type")
        pooling = int(raw) if raw is not None and raw.strip().lstrip("-").isdigit() else _c.LLAMA_POOLING_TYPE_NONE
        if pooling == _c.LLAMA_POOLING_TYPE_RANK:
            raise UnsupportedModelError(f"{self.path}: a reranking model scores pairs, it gives no embeddings",
                                        "use an embedding model or a chat model")
        if pooling not in _POOLING_NAMES:
            return _c.LLAMA_POOLING_TYPE_MEAN
        return pooling

    def tokenize(self, text: str) -> list[int]:
        """The tokens ``text`` is embedded from: with the model's own BOS/EOS (BERT's CLS and SEP)."""
        return self.native_model.tokenize(text, add_special=True, parse_special=False)

    def embed(self, inputs: Sequence[str | Sequence[int]], *, dimensions: int | None = None,
              truncate: bool = False) -> Embeddings:
        """Unit vectors of ``inputs`` (texts or token lists), in order, and each one's token count.

        ``dimensions`` keeps the first that many numbers of each vector and normalises again
        (1 to ``n_embd``). An input longer than the context raises ``InputTooLongError`` naming it,
        unless ``truncate`` keeps its first ``n_ctx`` tokens; an empty one raises too.
        """
        if dimensions is not None and not 1 <= dimensions <= self.n_embd:
            raise InvalidRequestError(f"dimensions must be between 1 and {self.n_embd}, this model's "
                                      f"embedding size (got {dimensions})")
        token_lists = [self._tokens(i, item, truncate) for i, item in enumerate(inputs)]
        vectors = np.zeros((len(token_lists), self.n_embd), dtype=np.float32)
        with self._lock:
            if self._context.ptr is None:
                raise GenerationError("the embedding model is closed")
            for group in _groups(token_lists, self.n_ctx, self._context.n_seq_max):
                rows = self._context.pooled([token_lists[i] for i in group], self.n_embd)
                vectors[group] = rows
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
        return Embeddings(_unit_rows(vectors), tuple(len(t) for t in token_lists))

    def _tokens(self, index: int, item: str | Sequence[int], truncate: bool) -> list[int]:
        tokens = self.tokenize(item) if isinstance(item, str) else list(item)
        if not tokens:
            raise InvalidRequestError(f"input {index} is empty", "give every input some text")
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"input {index} holds token {bad}, outside the vocabulary "
                                      f"(0..{self.n_vocab - 1})")
        if len(tokens) > self.n_ctx:
            if not truncate:
                raise InputTooLongError(index, len(tokens), self.n_ctx)
            del tokens[self.n_ctx:]
        return tokens

    def close(self) -> None:
        """Free the context (and the model, unless it is a chat model's); safe to call twice."""
        with self._lock:
            self._context.close()
            if self._owned:
                self.native_model.close()

    def __enter__(self) -> LlamaCppEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a row of zeros stays zeros)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _groups(token_lists: list[list[int]], max_tokens: int, max_sequences: int) -> Iterator[list[int]]:
    """Indices of consecutive inputs that go into one decode: at most ``max_tokens`` tokens and
    ``max_sequences`` inputs each."""
    group: list[int] = []
    used = 0
    for i, tokens in enumerate(token_lists):
        if group and (used + len(tokens) > max_tokens or len(group) == max_sequences):
            yield group
            group, used = [], 0
        group.append(i)
        used += len(tokens)
    if group:
        yield group


class _EmbeddingContext:
    """A ``llama_context`` with embeddings on, pooling each sequence, and its batch (ctypes here)."""

    def __init__(self, model: native.NativeModel, n_ctx: int, pooling: int, n_threads: int,
                 n_threads_batch: int) -> None:
        params = _c.llama_context_default_params()
        # llama.cpp reserves an output per sequence within the batch's outputs: no more sequences
        # than tokens. It also rounds the context up to a multiple of the sequences, and a context
        # larger than the batch then fails an assertion in the graph: round it here, batch alike.
        self.n_seq_max = params.n_seq_max = min(SEQUENCES_PER_DECODE, n_ctx)
        n_cells = -(-n_ctx // self.n_seq_max) * self.n_seq_max
        # One batch holds the whole context, in one micro-batch: llama.cpp pools per micro-batch,
        # so a sequence split across two would be pooled twice, wrongly (and a non-causal encoder
        # needs its whole input in one). The micro-batch is bounded by keeping the context small
        # (``cli.embed.EMBEDDING_CTX`` by default), not by splitting it.
        params.n_ctx = params.n_batch = params.n_ubatch = n_cells
        params.kv_unified = True  # the sequences share the n_ctx cells (not n_ctx / n_seq_max each)
        params.embeddings = True
        params.pooling_type = pooling
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        # Flash attention's CPU kernel takes another path past 64 tokens, and an input's vector would
        # then depend (by up to 5e-3) on what else shares its decode; without it, batched and
        # one-by-one agree to rounding.
        params.flash_attn_type = _c.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.ptr = native._new_context(model, params, "an embedding context", "try a smaller --ctx")
        self.memory = _c.llama_get_memory(self.ptr)  # NULL for an encoder-only model (BERT): nothing to clear
        self.batch = _c.llama_batch_init(n_cells, 0, self.n_seq_max)

    def pooled(self, token_lists: Sequence[Sequence[int]], n_embd: int) -> np.ndarray:
        """Evaluate each token list as its own sequence in one decode; their pooled rows, in order."""
        if self.memory:
            _c.llama_memory_clear(self.memory, True)
        batch = self.batch
        i = 0
        for seq, tokens in enumerate(token_lists):
            for pos, token in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, True
                batch.seq_id[i][0] = seq
                i += 1
        batch.n_tokens = i
        rc = _c.llama_decode(self.ptr, batch)
        if rc != 0:
            raise GenerationError(f"llama.cpp could not embed {len(token_lists)} inputs ({i} tokens): code {rc}")
        rows = np.empty((len(token_lists), n_embd), dtype=np.float32)
        for seq in range(len(token_lists)):
            pointer = _c.llama_get_embeddings_seq(self.ptr, seq)
            if not pointer:
                raise GenerationError("llama.cpp returned no pooled embedding")
            rows[seq] = np.ctypeslib.as_array(pointer, shape=(n_embd,))
        return rows

    def close(self) -> None:
        if self.ptr:
            _c.llama_batch_free(self.batch)
            _c.llama_free(self.ptr)
            self.ptr = None
