"""The one path every wire format's request takes: prompt, checks, a slot, and the answer's events.

``start`` renders and measures the prompt (the tools in it, see ``tools``), refuses what cannot
fit, sets the grammar the tools or the response format ask for, admits the request and runs it
on a worker thread, which holds a slot of the model for it. It returns once the generation has
really started, so whatever kept it from starting (a full queue, a bad grammar, a token outside
the vocabulary) is still an HTTP error. The worker turns the slot's token events into
``AnswerEvent``s (``AnswerShaper``: logprobs as text, tool calls read out of the text), which
``Generation.events`` hands to the wire format to render. A client that goes away cancels the
generation, which stops within one token and frees the slot.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from functools import wraps
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from edge_runtime.backends.base import CancelToken, Model, SamplingParams, TokenEvent
from edge_runtime.errors import ContextLengthExceededError, EdgeRuntimeError
from edge_runtime.server.admission import request_bytes
from edge_runtime.server.requests import (
    AnswerEvent,
    Finished,
    GenerationRequest,
    TextPiece,
    TokenLogprob,
)
from edge_runtime.server.state import ServerState
from edge_runtime.server.tool_calls import ToolCallReader
from edge_runtime.server.tools import (
    CLOSE,
    fallback_messages,
    template_messages,
    template_takes_tools,
    tool_grammar,
)
from edge_runtime.server.wire import ApiError, new_id
from edge_runtime.session import FALLBACK_TEMPLATE, ChatFormatter

_END, _STARTED = object(), object()


def as_api_error(exc: BaseException) -> ApiError:
    """The HTTP error a failure is answered with (a 500 only for what no client caused)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return ApiError(400, exc.message, code="context_length_exceeded")
    if isinstance(exc, EdgeRuntimeError):
        if exc.http_status < 500:
            return ApiError(exc.http_status, exc.message, code=exc.code)
        retry = {"Retry-After": "2"} if exc.http_status == 503 else None
        return ApiError(exc.http_status, exc.message, type="server_error", code=exc.code, headers=retry)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


Handler = Callable[..., Awaitable[Response]]


def answering_errors(body: Callable[[ApiError], dict[str, Any]]) -> Callable[[Handler], Handler]:
    """A route decorator for a wire format with its own error shape: a failure is answered with
    ``body(error)``, the error's status and its headers."""
    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def answer(*args: Any) -> Response:
            try:
                return await handler(*args)
            except (ApiError, EdgeRuntimeError) as exc:
                error = as_api_error(exc)
                return JSONResponse(body(error), status_code=error.status, headers=error.headers)
        return answer
    return decorate


def loaded_model(state: ServerState) -> tuple[Model, ChatFormatter]:
    """The model and its chat formatter; a 503 while it loads or after it failed to."""
    model, formatter = state.model, state.formatter
    if model is None or formatter is None:
        if state.load_error:
            raise ApiError(503, "the model failed to load (the server's log says why)", type="server_error",
                           code="model_load_failed")
        raise ApiError(503, "the model is still loading", type="server_error", code="model_loading",
                       headers={"Retry-After": "1"})
    return model, formatter


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, up to ``limit`` bytes (413) and within ``timeout_s`` seconds (408).

    Both errors close the connection: the rest of the body is never read, so nothing else on
    that connection could be understood.
    """
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the body is larger than {limit} bytes", code="body_too_large",
                         headers={"Connection": "close"})
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(read(), timeout_s)
    except ClientDisconnect:
        raise ApiError(499, "the client closed the request") from None
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {timeout_s:g} s", code="body_timeout",
                       headers={"Connection": "close"}) from None


class Generation:
    """A request running on a slot: its answer's events, as they come."""

    def __init__(self, queue: asyncio.Queue, cancel: CancelToken, prompt_tokens: int) -> None:
        self._queue = queue
        self._cancel = cancel
        self.prompt_tokens = prompt_tokens

    async def events(self, request: Request | None = None) -> AsyncIterator[AnswerEvent]:
        """The events until ``Finished``; a failure on the way raises ``ApiError``.

        With ``request``, a client that leaves while nothing comes ends the wait (499); a
        streaming response watches the connection itself, so it passes none.
        """
        try:
            while True:
                item = await _next_item(self._queue, request)
                if item is _STARTED:
                    continue
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise as_api_error(item)
                yield item
        finally:
            self._cancel.cancel()

    def cancel(self) -> None:
        self._cancel.cancel()


async def start(state: ServerState, request: Request, req: GenerationRequest, body_bytes: int) -> Generation:
    """Check, admit and start ``req``; returns once the model has begun its answer."""
    model, formatter = loaded_model(state)
    # Before tokenizing (which grows with the body): prompt and answer together fit the context.
    state.memory.check(request_bytes(body_bytes, model.info.n_ctx))
    native = template_takes_tools(model.info.chat_template or FALLBACK_TEMPLATE)
    tokens = await asyncio.to_thread(request_tokens, model, formatter, req, native)
    n_ctx = model.info.n_ctx
    if req.max_tokens is not None and req.max_tokens >= n_ctx:
        raise ApiError(400, f"max_tokens is {req.max_tokens} but the context holds {n_ctx} tokens",
                       param="max_tokens", code="context_length_exceeded")
    room = n_ctx - len(tokens)
    if room <= 0 or (req.max_tokens is not None and req.max_tokens > room):
        asked = len(tokens) + (req.max_tokens or 0)
        raise ApiError(400, f"this request needs {asked} tokens ({len(tokens)} in the prompt) but the "
                            f"context holds {n_ctx}", param="messages" if req.kind == "chat" else "prompt",
                       code="context_length_exceeded")
    params = _constrained(replace(req.params, max_tokens=req.max_tokens or room), req, native)
    reader = None
    if req.tools is not None and req.tools.calls_possible:
        reader = ToolCallReader(req.tools, lambda: new_id("call_"), incremental=params.grammar is not None)
    shaper = AnswerShaper(model, reader, len(tokens))
    state.admit()
    cancel = CancelToken()
    queue = _generate_in_thread(state, model, tokens, params, shaper, cancel)
    try:
        first = await _next_item(queue, request)
        if isinstance(first, BaseException):
            raise as_api_error(first)
        if first is _END:  # nothing to start: the events say so
            queue.put_nowait(_END)
    except BaseException:
        cancel.cancel()
        raise
    return Generation(queue, cancel, len(tokens))


def request_tokens(model: Model, formatter: ChatFormatter, req: GenerationRequest, native: bool) -> list[int]:
    """The prompt tokens a request evaluates: its chat rendered (with its tools) or its raw prompt."""
    if req.kind != "chat":
        return model.tokenize(req.prompt or "", special=False, add_bos=model.info.add_bos)
    use = req.tools
    in_history = any(m.tool_calls or m.role == "tool" for m in req.messages)
    if native and (in_history or (use is not None and use.calls_possible)):
        tools = [t.to_dict() for t in use.tools] if use is not None and use.calls_possible else None
        return formatter.tokens(template_messages(req.messages), tools=tools)  # type: ignore[arg-type]
    return formatter.tokens(fallback_messages(req.messages, use))


def _constrained(params: SamplingParams, req: GenerationRequest, native: bool) -> SamplingParams:
    """``params`` with the grammar the tools ask for (or the stop that ends a free call)."""
    use = req.tools
    if use is None or not use.calls_possible:
        return params
    grammar = tool_grammar(use, native, params.json_schema)
    if grammar is not None:
        return replace(params, json_schema=None, grammar=grammar)
    if not native:  # the fallback's calls are one block: the answer ends with it
        return replace(params, stop=(*params.stop, CLOSE))
    return params


class AnswerShaper:
    """Turns a slot's token events into answer events: logprobs as text, tool calls read out of the text."""

    def __init__(self, model: Model, reader: ToolCallReader | None, prompt_tokens: int) -> None:
        self._model = model
        self._reader = reader
        self._prompt_tokens = prompt_tokens
        self._pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not gone out yet
        self._bytes: dict[int, bytes] = {}

    def push(self, event: TokenEvent) -> list[AnswerEvent]:
        """The answer events ``event`` completes (none while text is held back)."""
        if event.token is not None and event.logprob is not None:
            top = tuple(self._logprob(t, v) for t, v in event.top_logprobs)
            self._pending.append(replace(self._logprob(event.token, event.logprob), top=top))
        out: list[AnswerEvent] = []
        if self._reader is not None:
            out += self._reader.push(event.text)
        elif event.text:
            out.append(TextPiece(event.text))
        if out and self._pending:
            out[0] = replace(out[0], logprobs=tuple(self._pending))
            self._pending = []
        if event.finish_reason is None:
            return out
        if self._reader is not None:
            out += self._reader.finish()
        reason = event.finish_reason
        if reason == "stop" and self._reader is not None and self._reader.calls:
            reason = "tool_calls"
        generated = event.stats.gen_tokens if event.stats else 0
        out.append(Finished(reason, self._prompt_tokens, generated, event.stats, tuple(self._pending)))
        self._pending = []
        return out

    def _logprob(self, token: int, logprob: float) -> TokenLogprob:
        raw = self._bytes.get(token)
        if raw is None:
            raw = self._bytes[token] = self._model.token_bytes(token)
        return TokenLogprob(raw.decode("utf-8", errors="replace"), logprob, raw)


def _generate_in_thread(state: ServerState, model: Model, tokens: list[int], params: SamplingParams,
                        shaper: AnswerShaper, cancel: CancelToken) -> asyncio.Queue:
    """Run the generation on a worker thread; its items arrive on an asyncio queue.

    The items: ``_STARTED`` once the model has begun, then answer events, an exception if it
    failed, and ``_END``.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: object) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            cancel.cancel()

    def deliver(events: Iterator[TokenEvent], observe: bool) -> None:
        for i, event in enumerate(events):
            if i == 0:
                put(_STARTED)
            for item in shaper.push(event):
                put(item)
            if observe and event.finish_reason is not None:  # here, so abandoned streams count too
                state.metrics.observe(event.stats, event.finish_reason)

    def work() -> None:
        running = False
        cached = state.config.response_cache
        try:
            key, entry = cached.find(tokens, params) if cached is not None else (None, None)  # None: not cacheable
            if key is not None:
                (state.metrics.response_cache_hits if entry else state.metrics.response_cache_misses).inc()
            if entry is not None:  # a replay needs no slot and computes nothing
                deliver(cached.replay(entry, len(tokens), cancel), observe=False)
                return
            with model.acquire_slot(tokens, timeout=state.config.queue_timeout_s) as slot:
                running = True
                state.started()
                events = slot.generate(tokens, params, cancel=cancel)
                deliver(cached.recording(key, events) if cached is not None else events, True)
        except BaseException as exc:  # delivered to the handler, which answers with it
            put(exc)
        finally:
            state.done(running)
            put(_END)

    threading.Thread(target=work, name="edgert-request", daemon=True).start()
    return queue


async def _next_item(queue: asyncio.Queue, request: Request | None) -> Any:
    """The next item from the worker; a client that left meanwhile ends the wait (499)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if request is not None and await request.is_disconnected():
                raise ApiError(499, "the client closed the request") from None
