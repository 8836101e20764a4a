"""OpenAI's answers: chat and text completions, whole or as chunks, with tool calls and logprobs.

Shapes as openai-python reads them: every choice carries ``logprobs`` (null unless asked); a
streamed tool call's first delta has its ``index``, ``id``, ``type`` and ``function.name``, the
later ones only ``index`` and a piece of ``function.arguments`` (the SDK joins repeated strings,
so nothing is sent twice); ``finish_reason`` is ``tool_calls`` when the answer is calls.

Logprobs: chat's ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``;
completions' ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` (each position's top
alternatives and the token taken, as OpenAI's), whose offsets count
characters from the start of the prompt, as OpenAI's do (the first answer token's is the
prompt's length). A token's ``bytes`` are the UTF-8 of its text; a token that is part of a
character shows as U+FFFD, since the model's seam gives text, not bytes.
"""

from __future__ import annotations

import time
from typing import Any

from edge_runtime.server.requests import (
    Answer,
    AnswerEvent,
    Finished,
    GenerationRequest,
    TextPiece,
    TokenLogprob,
    ToolCallPiece,
)
from edge_runtime.server.wire import logprob_entry


def _usage(finished: Finished) -> dict[str, Any]:
    """OpenAI's usage, with the prompt tokens the KV cache (or the response cache) already held."""
    cached = finished.stats.cached_tokens if finished.stats is not None else 0
    return {"prompt_tokens": finished.prompt_tokens, "completion_tokens": finished.completion_tokens,
            "total_tokens": finished.prompt_tokens + finished.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _envelope(req: GenerationRequest, rid: str, model_id: str, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model_id}


def _chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...], asked: bool) -> dict[str, Any] | None:
    if not asked:
        return None
    return {"content": [logprob_entry(t) for t in items], "refusal": None}


class TextLogprobs:
    """Completions' logprobs, with the character offsets running on from chunk to chunk.

    A token's offset is where its text starts in prompt + answer, counted in characters of the
    answer's bytes so far: the tokens of one character split over several start where it does.
    """

    def __init__(self, prompt: str) -> None:
        self.prompt_chars = len(prompt)
        self.answer = bytearray()

    def render(self, items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict[str, Any]:
        offsets = []
        for t in items:
            offsets.append(self.prompt_chars + len(self.answer.decode("utf-8", errors="ignore")))
            self.answer += t.raw
        return {"tokens": [t.token for t in items], "token_logprobs": [t.logprob for t in items],
                "top_logprobs": [{**{a.token: a.logprob for a in t.top}, t.token: t.logprob} for t in items],
                "text_offset": offsets}


def completion_body(req: GenerationRequest, rid: str, model_id: str, answer: Answer) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    finished = answer.finished
    assert finished is not None
    asked = req.params.logprobs is not None
    logprobs = answer.logprobs + list(finished.logprobs)
    reason = _finish_reason(req, finished)
    if req.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": answer.text, "refusal": None}
        if answer.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}}
                                     for c in answer.tool_calls]
            message["content"] = answer.text or None
        choice = {"index": 0, "message": message, "logprobs": _chat_logprobs(logprobs, asked),
                  "finish_reason": reason}
    else:
        rendered = TextLogprobs(req.prompt or "").render(logprobs) if asked else None
        choice = {"index": 0, "text": answer.text, "logprobs": rendered, "finish_reason": reason}
    return {**_envelope(req, rid, model_id, False), "choices": [choice], "usage": _usage(finished)}


def _finish_reason(req: GenerationRequest, finished: Finished) -> str:
    # "cancelled" never reaches a client that is still there; OpenAI has no word for it.
    return "stop" if finished.reason == "cancelled" else finished.reason


class ChunkWriter:
    """The chunks of one streamed answer, in order: the opening role, the deltas, the finish, the usage."""

    def __init__(self, req: GenerationRequest, rid: str, model_id: str, include_usage: bool) -> None:
        self.req, self.rid, self.model_id, self.include_usage = req, rid, model_id, include_usage
        self._asked = req.params.logprobs is not None
        self._text_logprobs = TextLogprobs(req.prompt or "")

    def opening(self) -> list[dict[str, Any]]:
        """What goes before the first delta: the assistant's role, for chat."""
        if self.req.kind != "chat":
            return []
        return [self._chunk({"role": "assistant", "content": ""}, ())]

    def render(self, event: AnswerEvent) -> list[dict[str, Any]]:
        """The chunks of one answer event."""
        if isinstance(event, Finished):
            out = [self._chunk({} if self.req.kind == "chat" else "", event.logprobs,
                               _finish_reason(self.req, event))]
            if self.include_usage:
                out.append({**_envelope(self.req, self.rid, self.model_id, True), "choices": [],
                            "usage": _usage(event)})
            return out
        if isinstance(event, TextPiece):
            return [self._chunk({"content": event.text} if self.req.kind == "chat" else event.text,
                                event.logprobs)]
        return [self._chunk({"tool_calls": [_call_delta(event)]}, event.logprobs)]

    def _chunk(self, delta: dict[str, Any] | str, logprobs: tuple[TokenLogprob, ...],
               finish: str | None = None) -> dict[str, Any]:
        if isinstance(delta, dict):
            choice: dict[str, Any] = {"index": 0, "delta": delta,
                                      "logprobs": _chat_logprobs(logprobs, self._asked and bool(logprobs)),
                                      "finish_reason": finish}
        else:
            rendered = self._text_logprobs.render(logprobs) if self._asked and logprobs else None
            choice = {"index": 0, "text": delta, "logprobs": rendered, "finish_reason": finish}
        return {**_envelope(self.req, self.rid, self.model_id, True), "choices": [choice]}


def _call_delta(piece: ToolCallPiece) -> dict[str, Any]:
    if piece.id is None:
        return {"index": piece.index, "function": {"arguments": piece.arguments}}
    return {"index": piece.index, "id": piece.id, "type": "function",
            "function": {"name": piece.name, "arguments": piece.arguments}}
