"""OpenAI's /v1/chat/completions and /v1/completions: parse, run through ``runner``, render."""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edge_runtime.server.openai_requests import include_usage, parse_chat_request, parse_completion_request
from edge_runtime.server.openai_responses import ChunkWriter, completion_body
from edge_runtime.server.requests import Answer
from edge_runtime.server.runner import Generation, loaded_model, read_body, start
from edge_runtime.server.state import ServerState
from edge_runtime.server.wire import ApiError, new_id, parse_json_body, sse


async def complete(state: ServerState, kind: str, request: Request) -> Response:
    """A chat (``kind`` "chat") or text completion, whole or streamed."""
    loaded_model(state)  # a 503 before the body is read
    raw = await read_body(request, state.config.max_body_bytes, state.config.body_timeout_s)
    data = parse_json_body(raw)
    req = parse_chat_request(data) if kind == "chat" else parse_completion_request(data)
    if req.model not in (state.config.model_id, "default"):
        raise ApiError(404, f"the model '{req.model}' does not exist; this server serves "
                            f"'{state.config.model_id}'", param="model", code="model_not_found")
    generation = await start(state, request, req, len(raw))
    rid = new_id("chatcmpl-" if kind == "chat" else "cmpl-")
    if req.stream:
        writer = ChunkWriter(req, rid, state.config.model_id, include_usage(data))
        return StreamingResponse(_stream(writer, generation), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    answer = Answer()
    async for event in generation.events(request):
        answer.add(event)
    if answer.finished is None:
        raise ApiError(500, "the generation ended without a result", type="server_error")
    return JSONResponse(completion_body(req, rid, state.config.model_id, answer))


async def _stream(writer: ChunkWriter, generation: Generation) -> AsyncIterator[bytes]:
    try:
        for chunk in writer.opening():
            yield sse(chunk)
        try:
            async for event in generation.events():
                for chunk in writer.render(event):
                    yield sse(chunk)
        except ApiError as exc:  # after the 200 went out: the error is the stream's last event
            yield sse(exc.body())
        yield sse("[DONE]")
    finally:
        generation.cancel()  # a client that went away stops its generation within one token
