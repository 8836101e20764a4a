"""Anthropic's /v1/messages and /v1/messages/count_tokens: parse, run through ``runner``, render.

Streams are Anthropic's SSE events, each with its ``event:`` line (the SDK routes on it):
``message_start``, per content block ``content_block_start``/``_delta``/``_stop`` (text as
``text_delta``, a tool call's arguments as ``input_json_delta``), ``message_delta`` with the
stop reason and the output tokens, ``message_stop``. A failure after the stream began is an
``error`` event, with nothing after it. Errors are Anthropic's shape (``anthropic_wire``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_runtime.server.anthropic_wire import (
    error_body,
    matched_stop,
    message_body,
    parse_messages,
    stop_reason,
    usage,
)
from edge_runtime.server.requests import Answer, AnswerEvent, Finished, GenerationRequest, TextPiece, TokenLogprob
from edge_runtime.server.runner import answering_errors, loaded_model, read_body, request_tokens, start
from edge_runtime.server.state import ServerState
from edge_runtime.server.tools import template_takes_tools
from edge_runtime.server.wire import ApiError, new_id, parse_json_body
from edge_runtime.session import FALLBACK_TEMPLATE


def anthropic_routes(state: ServerState) -> list[Route]:
    """The routes, bound to ``state`` (a ``?beta=true`` query changes nothing)."""
    return [Route("/v1/messages", partial(_messages, state), methods=["POST"]),
            Route("/v1/messages/count_tokens", partial(_count_tokens, state), methods=["POST"])]


_anthropic_errors = answering_errors(error_body)  # Anthropic's error shape, with its status


async def _request(state: ServerState, request: Request, counting: bool) -> tuple[GenerationRequest, int]:
    loaded_model(state)  # a 503 before the body is read
    raw = await read_body(request, state.config.max_body_bytes, state.config.body_timeout_s)
    req = parse_messages(parse_json_body(raw), counting=counting)
    if req.model not in (state.config.model_id, "default"):
        raise ApiError(404, f"model: {req.model} (this server serves '{state.config.model_id}')")
    return req, len(raw)


@_anthropic_errors
async def _count_tokens(state: ServerState, request: Request) -> Response:
    """The prompt's tokens, measured as ``start`` measures them (template and tools included)."""
    req, _ = await _request(state, request, counting=True)
    model, formatter = loaded_model(state)
    native = template_takes_tools(model.info.chat_template or FALLBACK_TEMPLATE)
    tokens = await asyncio.to_thread(request_tokens, model, formatter, req, native)
    return JSONResponse({"input_tokens": len(tokens)})


@_anthropic_errors
async def _messages(state: ServerState, request: Request) -> Response:
    req, size = await _request(state, request, counting=False)
    generation = await start(state, request, req, size)
    rid = new_id("msg_")
    if req.stream:
        events = _EventWriter(rid, req, generation.prompt_tokens)
        return StreamingResponse(_stream(events, generation.events(), generation.cancel),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    answer = Answer()
    async for event in generation.events(request):
        answer.add(event)
    if answer.finished is None:
        raise ApiError(500, "the generation ended without a result")
    return JSONResponse(message_body(rid, req, answer))


class _EventWriter:
    """The SSE events of one streamed message, in the order the SDK accumulates them."""

    def __init__(self, rid: str, req: GenerationRequest, prompt_tokens: int) -> None:
        self.rid, self.req, self.prompt_tokens = rid, req, prompt_tokens
        self._tokens: list[TokenLogprob] = []  # to tell which stop sequence matched
        self._open: str | None = None  # the kind of the content block being written
        self._index = -1  # of that block

    def opening(self) -> list[bytes]:
        message = {"id": self.rid, "type": "message", "role": "assistant", "model": self.req.model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": usage(self.prompt_tokens, 0)}
        return [_event("message_start", {"message": message})]

    def render(self, event: AnswerEvent) -> list[bytes]:
        out: list[bytes] = []
        self._tokens += event.logprobs
        if isinstance(event, TextPiece):
            if not event.text:
                return out
            if self._open != "text":
                out += self._start({"type": "text", "text": ""})
                out.append(_event("ping", {}))
            out.append(self._delta({"type": "text_delta", "text": event.text}))
        elif isinstance(event, Finished):
            out += self._close()
            stop = matched_stop(self.req, event, self._tokens)
            delta = {"stop_reason": "stop_sequence" if stop else stop_reason(event), "stop_sequence": stop}
            out.append(_event("message_delta", {"delta": delta, "usage": {"output_tokens": event.completion_tokens}}))
            out.append(_event("message_stop", {}))
        else:
            if event.id is not None:  # a new call: its own block
                out += self._start({"type": "tool_use", "id": event.id, "name": event.name, "input": {}})
            if event.arguments:
                out.append(self._delta({"type": "input_json_delta", "partial_json": event.arguments}))
        return out

    def _start(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._index += 1
        self._open = block["type"]
        out.append(_event("content_block_start", {"index": self._index, "content_block": block}))
        return out

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _event("content_block_delta", {"index": self._index, "delta": delta})

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", {"index": self._index})]


async def _stream(writer: _EventWriter, events: AsyncIterator[AnswerEvent],
                  cancel: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        for chunk in writer.opening():
            yield chunk
        try:
            async for event in events:
                for chunk in writer.render(event):
                    yield chunk
        except ApiError as exc:  # after the 200 went out: an error event ends the stream
            yield _event("error", error_body(exc))
    finally:
        cancel()  # a client that went away stops its generation within one token


def _event(name: str, data: dict[str, Any]) -> bytes:
    """One SSE event: the ``event:`` line, and ``data`` whose ``type`` is the same name."""
    payload = {"type": name, **data} if name != "error" else data
    return f"event: {name}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
