"""Ollama's API on the same port: /api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show,
/api/ps, /api/version, /.

Requests go through ``runner`` like OpenAI's; answers are Ollama's objects (``ollama_wire``),
streamed as NDJSON (one object a line) unless the body says ``"stream": false``. Errors are
``{"error": "..."}`` with their status; one after streaming began is the stream's last line.
/api/embed and the older /api/embeddings answer from the server's embedding model (``embeddings``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_runtime.backends.base import Model, ModelInfo
from edge_runtime.server.embeddings import embed, embedding_size, loaded_embedder
from edge_runtime.server.ollama_wire import (
    OLLAMA_VERSION,
    check_model,
    created_at,
    final_fields,
    model_details,
    ollama_calls,
    ollama_logprobs,
    parse_chat,
    parse_generate,
    served_name,
    streams,
)
from edge_runtime.server.requests import Answer, Finished, GenerationRequest, TextPiece
from edge_runtime.server.runner import Generation, answering_errors, loaded_model, read_body, start
from edge_runtime.server.state import ServerState
from edge_runtime.server.wire import ApiError, field_value, parse_json_body

Handler = Callable[[ServerState, Request], Awaitable[Response]]
NEVER = "2318-01-01T00:00:00Z"  # /api/ps' expires_at: the model stays loaded while the server runs


def ollama_routes(state: ServerState) -> list[Route]:
    """The routes, bound to ``state``."""
    return [
        Route("/", partial(_root, state), methods=["GET"]),
        Route("/api/version", partial(_version, state), methods=["GET"]),
        Route("/api/tags", partial(_tags, state), methods=["GET"]),
        Route("/api/ps", partial(_ps, state), methods=["GET"]),
        Route("/api/show", partial(_show, state), methods=["POST"]),
        Route("/api/chat", partial(_generate, state, "chat"), methods=["POST"]),
        Route("/api/generate", partial(_generate, state, "generate"), methods=["POST"]),
        Route("/api/embed", partial(_embed, state), methods=["POST"]),
        Route("/api/embeddings", partial(_embeddings, state), methods=["POST"]),
    ]


# Ollama's error shape: ``{"error": "..."}`` with the status.
_ollama_errors = answering_errors(lambda error: {"error": error.message})


async def _root(state: ServerState, request: Request) -> Response:
    return PlainTextResponse("Ollama is running")


async def _version(state: ServerState, request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


def _file_format(model: Model) -> str:
    """The artifact's format, from the backend package that loaded it."""
    module = type(model).__module__
    return next((fmt for key, fmt in (("llamacpp", "gguf"), ("onnx", "onnx"), ("tflite", "tflite"))
                 if f".{key}" in module), "gguf")


def _listing(state: ServerState, model: Model) -> dict[str, Any]:
    name = served_name(state.config.model_id)
    return {"name": name, "model": name, "size": model.info.size_bytes,
            "details": model_details(model.info, _file_format(model))}


def _capabilities(state: ServerState) -> list[str]:
    """The chat model's capabilities: it embeds too when it is also the embedding model."""
    embeds = state.config.embedding_model_id == state.config.model_id
    return ["completion", "tools", *(["embedding"] if embeds else [])]


def _separate_embedding_id(state: ServerState) -> str | None:
    """The embedding model's id when it is another model than the chat model (else None)."""
    model_id = state.config.embedding_model_id
    return model_id if model_id not in (None, state.config.model_id) else None


@_ollama_errors
async def _tags(state: ServerState, request: Request) -> Response:
    model, _ = loaded_model(state)
    models = [{**_listing(state, model), "capabilities": _capabilities(state)}]
    embedding_id = _separate_embedding_id(state)
    if embedding_id is not None:
        embedder, _ = loaded_embedder(state)
        name = served_name(embedding_id)
        models.append({"name": name, "model": name, "size": embedder.info.size_bytes,
                       "details": model_details(embedder.info, "gguf"), "capabilities": ["embedding"]})
    return JSONResponse({"models": models})


@_ollama_errors
async def _ps(state: ServerState, request: Request) -> Response:
    model, _ = loaded_model(state)
    return JSONResponse({"models": [{**_listing(state, model), "expires_at": NEVER, "size_vram": 0,
                                     "context_length": model.info.n_ctx}]})


@_ollama_errors
async def _show(state: ServerState, request: Request) -> Response:
    """/api/show of the chat model or of the embedding model."""
    model, _ = loaded_model(state)
    data, _ = await _body(state, request)
    name = data.get("model", data.get("name"))
    embedding_id = _separate_embedding_id(state)
    if embedding_id is not None and name in (embedding_id, served_name(embedding_id)):
        embedder, _ = loaded_embedder(state)
        return JSONResponse(_shown(embedding_id, embedder.info, "gguf", ["embedding"]))
    check_model(name, state.config.model_id)
    return JSONResponse(_shown(state.config.model_id, model.info, _file_format(model), _capabilities(state)))


def _shown(model_id: str, info: ModelInfo, file_format: str, capabilities: list[str]) -> dict[str, Any]:
    """/api/show's answer for one served model."""
    return {
        "modelfile": f"# served by edge-runtime\nFROM {served_name(model_id)}\n",
        "parameters": f"num_ctx                        {info.n_ctx}",
        "template": info.chat_template or "",
        "details": model_details(info, file_format),
        # Ollama never leaves model_info out: clients (ollama-python among them) fail without it.
        "model_info": {"general.architecture": info.arch, "general.parameter_count": info.n_params,
                       f"{info.arch}.context_length": info.n_ctx_train},
        "capabilities": capabilities,
        "modified_at": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }


async def _body(state: ServerState, request: Request) -> tuple[dict[str, Any], int]:
    """The body as a JSON object, and its size."""
    raw = await read_body(request, state.config.max_body_bytes, state.config.body_timeout_s)
    if not raw.strip():
        raise ApiError(400, "missing request body")
    return parse_json_body(raw), len(raw)


@_ollama_errors
async def _generate(state: ServerState, route: str, request: Request) -> Response:
    """/api/chat (``route`` "chat") or /api/generate, whole or streamed."""
    began = time.perf_counter()
    loaded_model(state)  # a 503 before the body is read
    data, size = await _body(state, request)
    check_model(data.get("model"), state.config.model_id)
    shape = _ChatShape() if route == "chat" else _GenerateShape()
    empty = not data.get("messages") if route == "chat" else not data.get("prompt")
    if empty:  # Ollama's "load the model" request: it is loaded already
        reason = "unload" if data.get("keep_alive") in (0, "0", "0s") else "load"
        return JSONResponse({**shape.head(data["model"]), **shape.piece(""), "done": True, "done_reason": reason})
    req = parse_chat(data) if route == "chat" else parse_generate(data)
    generation = await start(state, request, req, size)
    if streams(data):
        return StreamingResponse(_stream(shape, req, generation, began), media_type="application/x-ndjson")
    answer = Answer()
    async for event in generation.events(request):
        answer.add(event)
    if answer.finished is None:
        raise ApiError(500, "the generation ended without a result")
    body = {**shape.head(req.model), **shape.piece(answer.text, answer.tool_calls and ollama_calls(answer.tool_calls)),
            **final_fields(answer.finished, time.perf_counter() - began)}
    if req.params.logprobs is not None:
        body["logprobs"] = ollama_logprobs(answer.logprobs)
    return JSONResponse(body)


@_ollama_errors
async def _embed(state: ServerState, request: Request) -> Response:
    """/api/embed: ``input`` a string or strings; longer than the context they are cut unless
    ``"truncate": false`` (then a 400)."""
    began = time.perf_counter()
    _, model_id = loaded_embedder(state)  # a 404 or 503 before the body is read
    data, _ = await _body(state, request)
    name = check_model(data.get("model"), model_id)
    inputs = data.get("input", [])
    if isinstance(inputs, str):
        inputs = [inputs] if inputs else []
    if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
        raise ApiError(400, "invalid input type: 'input' must be a string or an array of strings")
    truncate = field_value(data, "truncate", bool, True)
    dimensions = embedding_size(state, data)
    if not inputs:  # Ollama answers an empty input with no vectors
        return JSONResponse({"model": name, "embeddings": []})
    result = await embed(state, inputs, dimensions=dimensions, truncate=truncate)
    return JSONResponse({"model": name, "embeddings": result.vectors.tolist(),
                         "total_duration": int((time.perf_counter() - began) * 1e9), "load_duration": 0,
                         "prompt_eval_count": result.total_tokens})


@_ollama_errors
async def _embeddings(state: ServerState, request: Request) -> Response:
    """/api/embeddings, the older one: ``prompt`` (one string, cut to the context) to ``embedding``."""
    _, model_id = loaded_embedder(state)
    data, _ = await _body(state, request)
    check_model(data.get("model"), model_id)
    prompt = field_value(data, "prompt", str, "")
    if not prompt:
        return JSONResponse({"embedding": []})
    result = await embed(state, [prompt], truncate=True)
    return JSONResponse({"embedding": result.vectors[0].tolist()})


class _ChatShape:
    """/api/chat's objects: the text in ``message``."""

    def head(self, model: str) -> dict[str, Any]:
        return {"model": model, "created_at": created_at()}

    def piece(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = calls
        return {"message": message}


class _GenerateShape(_ChatShape):
    """/api/generate's objects: the text in ``response`` (always there: ollama-python 0.6.1 needs it)."""

    def piece(self, text: str, calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"response": text}


async def _stream(shape: _ChatShape, req: GenerationRequest, generation: Generation,
                  began: float) -> AsyncIterator[bytes]:
    """NDJSON: a line per text piece, the tool calls whole in one line, then the final line."""
    answer = Answer()  # gathers the tool calls: Ollama sends each one complete
    try:
        try:
            async for event in generation.events():
                answer.add(event)
                if isinstance(event, TextPiece) and event.text:
                    logprobs = {"logprobs": ollama_logprobs(event.logprobs)} if event.logprobs else {}
                    yield _line({**shape.head(req.model), **shape.piece(event.text), "done": False, **logprobs})
                elif isinstance(event, Finished):
                    if answer.tool_calls:
                        calls = ollama_calls(answer.tool_calls)
                        yield _line({**shape.head(req.model), **shape.piece("", calls), "done": False})
                    yield _line({**shape.head(req.model), **shape.piece(""),
                                 **final_fields(event, time.perf_counter() - began)})
        except ApiError as exc:  # after the 200 went out: the error is the stream's last line
            yield _line({"error": exc.message})
    finally:
        generation.cancel()  # a client that went away stops its generation within one token


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()
