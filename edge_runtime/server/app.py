"""The OpenAI-compatible HTTP API: one loaded model, its slots, a bounded queue in front.

Each request takes a slot of the model (continuous batching shares one llama.cpp context between
the slots) from a worker thread and streams the slot's events back to the event loop. Past
``parallel + queue`` requests in flight the answer is 429; a request that waits longer than
``queue_timeout`` for a slot gets 503. A client that goes away cancels its generation, which
stops within one token and frees the slot. Nothing is ever cancelled to make room.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_runtime.backends.base import CancelToken, Model, TokenEvent
from edge_runtime.errors import ContextLengthExceededError, EdgeRuntimeError
from edge_runtime.server.metrics import ServerMetrics
from edge_runtime.server.wire import (
    ApiError,
    CompletionRequest,
    chunk_body,
    completion_body,
    new_id,
    parse_completion_request,
    parse_json_body,
    sse,
    usage,
    usage_chunk,
)
from edge_runtime.session import ChatFormatter

_END = object()


@dataclass(frozen=True)
class ServerConfig:
    """What ``edgert serve`` was asked for."""

    model_id: str
    parallel: int = 4
    queue_size: int = 64
    queue_timeout_s: float = 120.0
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 2


class ServerState:
    """The model (once loaded) and the count of requests in flight."""

    def __init__(self, config: ServerConfig, load_model: Callable[[], Model]) -> None:
        self.config = config
        self._load_model = load_model
        self.model: Model | None = None
        self.formatter: ChatFormatter | None = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self._lock = threading.Lock()
        self.in_flight = 0  # running + waiting for a slot
        self.running = 0

    def load(self) -> None:
        try:
            model = self._load_model()
            self.formatter = ChatFormatter(model)
            self.model = model
        except EdgeRuntimeError as exc:
            self.load_error = exc.message
        except Exception as exc:  # keep serving /health with the reason instead of dying
            self.load_error = f"{type(exc).__name__}: {exc}"

    def admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.config.parallel + self.config.queue_size:
                raise ApiError(429, f"the server is busy: {self.in_flight} requests in flight",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            self.in_flight += 1
            self.metrics.queue_depth.set(self.in_flight - self.running)

    def started(self) -> None:
        with self._lock:
            self.running += 1
            self.metrics.slots_busy.set(self.running)
            self.metrics.queue_depth.set(self.in_flight - self.running)

    def done(self, was_running: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.running -= int(was_running)
            self.metrics.slots_busy.set(self.running)
            self.metrics.queue_depth.set(self.in_flight - self.running)


def create_app(config: ServerConfig, load_model: Callable[[], Model]) -> Starlette:
    """The ASGI application; the model loads in a thread when the server starts."""
    state = ServerState(config, load_model)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        loader = threading.Thread(target=state.load, name="edgert-model-load", daemon=True)
        loader.start()
        yield
        if state.model is not None:
            await asyncio.to_thread(state.model.close)

    routes = [
        Route("/health", partial(_health, state), methods=["GET"]),
        Route("/metrics", partial(_metrics, state), methods=["GET"]),
        Route("/v1/models", partial(_models, state), methods=["GET"]),
        Route("/v1/chat/completions", partial(_completions, state, "chat"), methods=["POST"]),
        Route("/v1/completions", partial(_completions, state, "text"), methods=["POST"]),
    ]
    handlers = {ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    middleware = []
    if config.allow_origins:  # no CORS headers at all unless origins are named
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.allow_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    if config.api_key:
        middleware.append(Middleware(BearerAuth, api_key=config.api_key))
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers,  # type: ignore[arg-type]
                    middleware=middleware)
    app.state.edgert = state
    return app


# -- endpoints --------------------------------------------------------------------------------

async def _health(state: ServerState, request: Request) -> Response:
    if state.model is not None:
        return JSONResponse({"status": "ok"})
    if state.load_error:
        return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
    return JSONResponse({"status": "loading"}, status_code=503)


async def _metrics(state: ServerState, request: Request) -> Response:
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def _models(state: ServerState, request: Request) -> Response:
    created = int(time.time())
    return JSONResponse({"object": "list", "data": [
        {"id": state.config.model_id, "object": "model", "created": created, "owned_by": "edge-runtime"}]})


async def _completions(state: ServerState, kind: str, request: Request) -> Response:
    endpoint = "chat" if kind == "chat" else "completions"
    try:
        response = await _complete(state, request, kind)
    except ApiError as exc:
        state.metrics.requests.labels(endpoint, str(exc.status)).inc()
        raise
    state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


async def _complete(state: ServerState, request: Request, kind: str) -> Response:
    model, formatter = state.model, state.formatter
    if model is None or formatter is None:
        raise ApiError(503, "the model is still loading" if not state.load_error else state.load_error,
                       type="server_error", code="model_loading", headers={"Retry-After": "1"})
    req = parse_completion_request(parse_json_body(await _read_body(request, state.config.max_body_bytes)), kind)
    if req.model not in (state.config.model_id, "default"):
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves "
                            f"'{state.config.model_id}'", param="model", code="model_not_found")
    tokens = await asyncio.to_thread(_prompt_tokens, model, formatter, req)
    n_ctx = model.info.n_ctx
    if req.max_tokens is not None and req.max_tokens >= n_ctx:
        raise ApiError(400, f"max_tokens is {req.max_tokens} but the context holds {n_ctx} tokens",
                       param="max_tokens", code="context_length_exceeded")
    room = n_ctx - len(tokens)
    if room <= 0 or (req.max_tokens is not None and req.max_tokens > room):
        asked = len(tokens) + (req.max_tokens or 0)
        raise ApiError(400, f"this request needs {asked} tokens ({len(tokens)} in the prompt) but the "
                            f"context holds {n_ctx}", param="messages" if kind == "chat" else "prompt",
                       code="context_length_exceeded")
    params = req.params.__class__(**{**req.params.__dict__, "max_tokens": req.max_tokens or room})
    state.admit()
    cancel = CancelToken()
    events = _generate_in_thread(state, model, tokens, params, cancel)
    try:
        first = await _first_event(request, events, cancel)
    except BaseException:
        cancel.cancel()
        raise
    rid = new_id(kind)
    if req.stream:
        return StreamingResponse(_sse_stream(state, req, rid, len(tokens), first, events, cancel),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _collect(state, request, req, rid, len(tokens), first, events, cancel)


def _prompt_tokens(model: Model, formatter: ChatFormatter, req: CompletionRequest) -> list[int]:
    if req.kind == "chat":
        return formatter.tokens(list(req.messages or ()))
    return model.tokenize(req.prompt or "", special=False, add_bos=model.info.add_bos)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is larger than {limit} bytes", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _generate_in_thread(state: ServerState, model: Model, tokens: list[int], params: Any,
                        cancel: CancelToken) -> asyncio.Queue:
    """Run the generation on a worker thread; its events arrive on an asyncio queue."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            cancel.cancel()

    def work() -> None:
        running = False
        try:
            with model.acquire_slot(tokens, timeout=state.config.queue_timeout_s) as slot:  # type: ignore[attr-defined]
                running = True
                state.started()
                for event in slot.generate(tokens, params, cancel=cancel):
                    put(event)
                    if event.finish_reason is not None:  # here, so abandoned streams count too
                        state.metrics.observe(event.stats, event.finish_reason)
        except BaseException as exc:  # delivered to the handler, which answers with it
            put(exc)
        finally:
            state.done(running)
            put(_END)

    threading.Thread(target=work, name="edgert-request", daemon=True).start()
    return events


async def _next_event(request: Request, events: asyncio.Queue) -> Any:
    """The next item from the worker; a client that left meanwhile ends the wait (499)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None


async def _first_event(request: Request, events: asyncio.Queue, cancel: CancelToken) -> Any:
    """The first event, or the error that kept the request from starting (queue timeout ...)."""
    item = await _next_event(request, events)
    if isinstance(item, BaseException):
        raise _as_api_error(item)
    return item


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return ApiError(400, exc.message, code="context_length_exceeded")
    if isinstance(exc, EdgeRuntimeError):
        retry = {"Retry-After": "2"} if exc.http_status == 503 else None
        return ApiError(exc.http_status, exc.message, type="server_error", code=exc.code, headers=retry)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


async def _sse_stream(state: ServerState, req: CompletionRequest, rid: str, n_prompt: int, first: Any,
                      events: asyncio.Queue, cancel: CancelToken) -> AsyncIterator[bytes]:
    model_id = state.config.model_id
    try:
        if req.kind == "chat":
            yield sse(chunk_body(req, rid, model_id, role=True))
        item = first
        while item is not _END:
            if isinstance(item, BaseException):
                yield sse(_as_api_error(item).body())
                break
            event: TokenEvent = item
            if event.text:
                yield sse(chunk_body(req, rid, model_id, text=event.text))
            if event.finish_reason is not None:
                yield sse(chunk_body(req, rid, model_id, finish=event.finish_reason))
                if req.include_usage:
                    yield sse(usage_chunk(req, rid, model_id, usage(event.stats, n_prompt)))
            item = await events.get()
        yield sse("[DONE]")
    finally:
        cancel.cancel()  # a client that went away stops its generation within one token


async def _collect(state: ServerState, request: Request, req: CompletionRequest, rid: str, n_prompt: int,
                   first: Any, events: asyncio.Queue, cancel: CancelToken) -> Response:
    pieces: list[str] = []
    item = first
    try:
        while item is not _END:
            if isinstance(item, BaseException):
                raise _as_api_error(item)
            event: TokenEvent = item
            pieces.append(event.text)
            if event.finish_reason is not None:
                body = completion_body(req, rid, state.config.model_id, "".join(pieces), event.finish_reason,
                                       usage(event.stats, n_prompt))
                return JSONResponse(body)
            item = await _next_event(request, events)
        raise ApiError(500, "the generation ended without a result", type="server_error")
    finally:
        cancel.cancel()


# -- errors -----------------------------------------------------------------------------------

async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    error = ApiError(exc.status_code, str(exc.detail), type=kind)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _internal_error(request: Request, exc: Exception) -> Response:
    error = ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
    return JSONResponse(error.body(), status_code=500)


class BearerAuth:
    """Every endpoint but /health wants ``Authorization: Bearer KEY`` (compared in constant time)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                error = ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                                 type="invalid_request_error", code="invalid_api_key")
                response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
