"""OpenAI's /v1/embeddings, and the one path every wire format's embedding request takes (``embed``).

The embedding model is the one ``edgert serve --embedding-model M`` loaded beside the chat model
(``ServerState.embedder``; the chat model's own weights when M is the same file). A request's
inputs are embedded together, several to a decode (``backends.llamacpp.embeddings``); the vectors
are unit length, cut to ``dimensions`` and normalised again when asked. Ollama's /api/embed and
/api/embeddings (``ollama_routes``) call ``embed`` too.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from edge_runtime.backends.base import Embedder, Embeddings
from edge_runtime.server.runner import as_api_error, read_body
from edge_runtime.server.state import ServerState
from edge_runtime.server.wire import ApiError, field_value, parse_json_body

MAX_INPUTS = 2048  # OpenAI's own limit on inputs per request
_OPENAI_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})


def loaded_embedder(state: ServerState) -> tuple[Embedder, str]:
    """The embedding model and its id; a 404 when the server has none, a 503 while it loads."""
    model_id = state.config.embedding_model_id
    if model_id is None:
        raise ApiError(404, "this server has no embedding model: start it with --embedding-model M "
                            "(M may be the chat model itself)", param="model", code="model_not_found")
    if state.embedder is None:
        if state.load_error:
            raise ApiError(503, "the models failed to load (the server's log says why)", type="server_error",
                           code="model_load_failed")
        raise ApiError(503, "the embedding model is still loading", type="server_error", code="model_loading",
                       headers={"Retry-After": "1"})
    return state.embedder, model_id


async def embed(state: ServerState, inputs: Sequence[str | Sequence[int]], *, dimensions: int | None = None,
                truncate: bool = False) -> Embeddings:
    """Embed ``inputs`` on a worker thread, counted among the requests in flight (429 past the queue).

    Whatever the input gets wrong (empty, too long, a token outside the vocabulary, ``dimensions``
    out of range) is an ``ApiError`` 400 naming it.
    """
    embedder, _ = loaded_embedder(state)
    if len(inputs) > MAX_INPUTS:
        raise ApiError(400, f"'input' holds {len(inputs)} items; at most {MAX_INPUTS} are accepted", param="input")
    state.admit()
    try:
        return await asyncio.to_thread(embedder.embed, inputs, dimensions=dimensions, truncate=truncate)
    except Exception as exc:
        error = as_api_error(exc)
        error.param = "input" if error.status == 400 else None
        raise error from None
    finally:
        state.done(False)


def embedding_size(state: ServerState, data: dict[str, Any]) -> int | None:
    """``data["dimensions"]``: from 1 to the model's embedding size, or None to keep them all."""
    embedder, _ = loaded_embedder(state)
    return field_value(data, "dimensions", int, minimum=1, maximum=embedder.n_embd)


def openai_inputs(value: Any) -> list[str | list[int]]:
    """OpenAI's ``input``: a string, an array of strings, one token array, or an array of token arrays."""
    def tokens(item: Any) -> bool:
        return isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item)

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, str) for v in value):
            return list(value)
        if tokens(value):
            return [value]
        if all(tokens(v) for v in value):
            return list(value)
    raise ApiError(400, "'input' must be a string, an array of strings, an array of tokens or an array of "
                        "token arrays, and not empty", param="input")


async def openai_embeddings(state: ServerState, request: Request) -> Response:
    """POST /v1/embeddings."""
    _, model_id = loaded_embedder(state)  # a 404 or 503 before the body is read
    data = parse_json_body(await read_body(request, state.config.max_body_bytes, state.config.body_timeout_s))
    unknown = sorted(set(data) - _OPENAI_FIELDS)
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not a field of an embedding request", param=unknown[0])
    model = field_value(data, "model", str)
    if model is None:
        raise ApiError(400, "'model' is required", param="model")
    if model not in (model_id, "default"):
        raise ApiError(404, f"the model '{model}' does not exist; this server embeds with '{model_id}'",
                       param="model", code="model_not_found")
    if "input" not in data:
        raise ApiError(400, "'input' is required", param="input")
    encoding = field_value(data, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be 'float' or 'base64' (got '{encoding}')",
                       param="encoding_format")
    dimensions = embedding_size(state, data)
    result = await embed(state, openai_inputs(data["input"]), dimensions=dimensions)
    rows = [_encoded(row, encoding) for row in result.vectors]
    return JSONResponse({
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model_id,
        "usage": {"prompt_tokens": result.total_tokens, "total_tokens": result.total_tokens},
    })


def _encoded(row: Any, encoding: str) -> list[float] | str:
    """A vector as JSON numbers, or as base64 of its little-endian float32 bytes (what the SDKs decode)."""
    if encoding == "base64":
        return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
    return row.tolist()
