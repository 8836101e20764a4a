"""The OpenAI-compatible HTTP API: one loaded model, its slots, a bounded queue in front.

Each request takes a slot of the model (continuous batching shares one llama.cpp context between
the slots) from a worker thread and streams the slot's events back to the event loop. Past
``parallel + queue`` requests in flight the answer is 429; a request that waits longer than
``queue_timeout`` for a slot gets 503. A client that goes away cancels its generation, which
stops within one token and frees the slot. Nothing is ever cancelled to make room.

In front of the routes: every request is counted (``metrics``), foreign Host names and web
origins are refused, then the key is asked for (``access``); a request that would take the process
past the memory its plan allows gets 503 (``admission``). Whatever a client sends wrong is
answered with a 4xx, never a 5xx; a 503 with ``Retry-After`` means the server is shedding load.

Each wire format (OpenAI's in ``openai_routes``) parses its body into the wire-neutral
``requests.GenerationRequest``, runs it through ``runner`` (the one path: prompt, tools, checks,
admission, slot, cancellation) and renders the answer's events in its own shape.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge_runtime.backends.base import Embedder, Model
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.server.access import CORS_HEADERS, HostOriginGuard, KeyGuard
from edge_runtime.server.anthropic_routes import anthropic_routes
from edge_runtime.server.embeddings import openai_embeddings
from edge_runtime.server.metrics import RequestCounter
from edge_runtime.server.ollama_routes import ollama_routes
from edge_runtime.server.openai_routes import complete
from edge_runtime.server.runner import as_api_error
from edge_runtime.server.state import ServerConfig as ServerConfig
from edge_runtime.server.state import ServerState
from edge_runtime.server.wire import ApiError


def create_app(config: ServerConfig, load_model: Callable[[], Model],
               load_embedder: Callable[[Model], Embedder] | None = None) -> Starlette:
    """The ASGI application; the model (and ``load_embedder(model)``'s embedding model, when given)
    loads in a thread when the server starts."""
    def load() -> Model:
        model = load_model()
        if load_embedder is not None:
            try:
                state.embedder = load_embedder(model)
            except BaseException:
                model.close()
                raise
        return model

    state = ServerState(config, load)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="edgert-model-load", daemon=True)
        loader.start()
        yield
        if state.embedder is not None:  # first: it may share the chat model's weights
            await asyncio.to_thread(state.embedder.close)
        if state.model is not None:
            await asyncio.to_thread(state.model.close)

    routes = [
        Route("/health", partial(_health, state), methods=["GET"]),
        Route("/metrics", partial(_metrics, state), methods=["GET"]),
        Route("/v1/models", partial(_models, state), methods=["GET"]),
        Route("/v1/chat/completions", partial(complete, state, "chat"), methods=["POST"]),
        Route("/v1/completions", partial(complete, state, "text"), methods=["POST"]),
        Route("/v1/embeddings", partial(openai_embeddings, state), methods=["POST"]),
        *ollama_routes(state),
        *anthropic_routes(state),
    ]
    handlers = {ApiError: _api_error, EdgeRuntimeError: _edge_runtime_error, HTTPException: _http_error,
                Exception: _internal_error}
    # Outermost first: count everything, refuse foreign hosts and origins, answer CORS preflights
    # (they carry no key), then ask for the key.
    middleware = [Middleware(RequestCounter, metrics=state.metrics),
                  Middleware(HostOriginGuard, hosts=config.allowed_hosts, origins=config.allow_origins)]
    if config.allow_origins:  # no CORS headers at all unless origins are named
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.allow_origins),
                                     allow_methods=["GET", "POST"], allow_headers=CORS_HEADERS))
    if config.api_key:
        middleware.append(Middleware(KeyGuard, api_key=config.api_key))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,  # type: ignore[arg-type]
                    middleware=middleware)
    app.state.edgert = state
    return app


# -- endpoints --------------------------------------------------------------------------------

async def _health(state: ServerState, request: Request) -> Response:
    """Liveness for probes, open without a key, so it says nothing but the state."""
    if state.model is not None:
        return JSONResponse({"status": "ok"})
    status = "failed" if state.load_error else "loading"
    return JSONResponse({"status": status}, status_code=503)


async def _metrics(state: ServerState, request: Request) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def _models(state: ServerState, request: Request) -> Response:
    created = int(time.time())
    ids = dict.fromkeys((state.config.model_id, state.config.embedding_model_id or state.config.model_id))
    return JSONResponse({"object": "list", "data": [
        {"id": model_id, "object": "model", "created": created, "owned_by": "edge-runtime"} for model_id in ids]})


# -- errors -----------------------------------------------------------------------------------

async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _edge_runtime_error(request: Request, exc: Exception) -> Response:
    """A user error from below (a chat template refusing the roles, ...): its own status, not a 500."""
    assert isinstance(exc, EdgeRuntimeError)
    return await _api_error(request, as_api_error(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    error = ApiError(exc.status_code, str(exc.detail), type=kind)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(error.body(), status_code=500)
