"""``edgert embed``: the embedding vectors of texts, one line each or one JSON document.

The embedding context is its own, not the chat plan's: ``EMBEDDING_CTX`` tokens at most per input
(fewer when the model was trained on fewer; ``--ctx`` overrides). It holds a whole decode in one
micro-batch without flash attention (``backends.llamacpp.embeddings``), so its buffers grow with
the square of the context; ``embedding_memory_bytes`` estimates them for ``serve``'s memory limit.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from edge_runtime.cli.options import CTX, MODEL, THREADS, WholeNumber
from edge_runtime.cli.output import print_json

# Most tokens an input may hold by default: what sentence-embedding models are trained on (BERT's
# 512), and it keeps the context's buffers modest (about 220 MiB at the peak for SmolLM2, most of it the
# logits of a full decode, instead of about 5.8 GiB at its chat context of 8192).
EMBEDDING_CTX = 512
_LOGIT_BYTES = 8  # per token and vocabulary entry: the logits tensor and llama.cpp's output buffer


def embedding_plan(model: str | None, ctx: int | None, threads: int | None) -> Any:
    """The plan of ``model`` on llama.cpp, the backend that computes embeddings (``serve`` uses it too):
    ``ctx`` tokens per input, by default ``EMBEDDING_CTX`` (capped at the model's training context)."""
    from edge_runtime.cli.options import plan_from_options

    return plan_from_options({"model": model, "backend": "llama.cpp", "ctx": ctx or EMBEDDING_CTX,
                              "threads": threads})


def embedding_memory_bytes(plan: Any, *, shared: bool) -> int:
    """What the embedding model adds to the process: its weights unless ``shared`` with the chat
    model, and its context (KV cells, the compute buffer without flash attention, and the logits of
    every token of a decode, which llama.cpp computes with embeddings on)."""
    from edge_runtime.formats.gguf import read_gguf_header
    from edge_runtime.planning.memory import IMPORT_BYTES, estimate_memory

    header = read_gguf_header(plan.artifact.path, parts=plan.artifact.parts)
    n_ctx = plan.settings.n_ctx  # one micro-batch holds the whole context (see the engine)
    estimate = estimate_memory(header, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, flash_attn=False)
    context = estimate.kv_bytes + estimate.compute_bytes + n_ctx * (header.n_vocab or 0) * _LOGIT_BYTES
    if shared:
        return context
    # llama_cpp is imported once for both models: its share of the overhead is the chat model's.
    return context + estimate.weights_bytes + estimate.overhead_bytes - IMPORT_BYTES


@click.command()
@click.argument("texts", nargs=-1)
@click.option("--model", "-m", type=MODEL, default=None,
              help="A .gguf file (any llama.cpp can pool: an embedding model or a chat model), or a store or "
                   "embedded model name with a GGUF artifact (default: smollm2).")
@click.option("--ctx", type=CTX, default=None,
              help=f"Most tokens one text may hold (default: {EMBEDDING_CTX}, or the model's own context if smaller).")
@click.option("--threads", type=THREADS, default=None, help="CPU threads, at most the logical CPUs.")
@click.option("--dimensions", type=WholeNumber(1), default=None,
              help="Keep the first N numbers of each vector (normalised again).")
@click.option("--truncate", is_flag=True, help="Cut a text longer than the context instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of one line per text.")
def embed(texts: tuple[str, ...], model: str | None, ctx: int | None, threads: int | None,
          dimensions: int | None, truncate: bool, as_json: bool) -> None:
    """Print the embedding of each TEXT (unit vectors), one line of numbers per text.

    Without TEXT, each line of standard input is one text. The model's own pooling applies (mean,
    CLS or last token); a chat model is mean-pooled.
    """
    if not texts:
        if sys.stdin.isatty():
            raise click.UsageError("give one or more TEXT arguments, or pipe one text per line")
        texts = tuple(line for line in sys.stdin.read().splitlines() if line.strip())
        if not texts:
            raise click.UsageError("standard input holds no text")
    from edge_runtime.backends import open_embedder

    plan = embedding_plan(model, ctx, threads)
    embedder = open_embedder(plan.artifact, plan.settings)
    try:
        result = embedder.embed(list(texts), dimensions=dimensions, truncate=truncate)
    finally:
        embedder.close()
    if as_json:
        print_json({"model": plan.artifact.label, "pooling": embedder.pooling_name, "context": embedder.n_ctx,
                    "dimensions": int(result.vectors.shape[1]), "embeddings": result.vectors.tolist(),
                    "token_counts": list(result.token_counts)})
        return
    for row in result.vectors:
        click.echo(" ".join(f"{value:.7g}" for value in row))
