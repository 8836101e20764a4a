"""The OpenAI wire format, defined once: request parsing and validation, response bodies, errors.

Every problem with a request becomes an ``ApiError`` carrying its HTTP status and an
OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from edge_runtime.backends.base import GenerationStats, SamplingParams

MAX_STOP_SEQUENCES = 4


class ApiError(Exception):
    """An error answered to the client; never a 500 for something the client sent."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class CompletionRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    kind: str  # "chat" or "text"
    model: str
    messages: tuple[dict[str, str], ...] | None
    prompt: str | None
    max_tokens: int | None
    params: SamplingParams
    stream: bool
    include_usage: bool


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    return data


def _field(data: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None,
           *, minimum: float | None = None, maximum: float | None = None) -> Any:
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{name}' must be {_type_name(types)}", param=name)
    if not isinstance(value, types):
        raise ApiError(400, f"'{name}' must be {_type_name(types)}", param=name)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ApiError(400, f"'{name}' must be between {minimum} and {maximum}", param=name)
    return value


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in seq))


def _messages(data: dict[str, Any]) -> tuple[dict[str, str], ...]:
    raw = data.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is understood here
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content")
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        out.append({"role": role, "content": content})
    return tuple(out)


def _stop(data: dict[str, Any]) -> tuple[str, ...]:
    stop = data.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} strings", param="stop")
    return tuple(s for s in stop if s)


def parse_completion_request(data: dict[str, Any], kind: str) -> CompletionRequest:
    """Validate a completion request body; raises ``ApiError`` (400) naming the bad field."""
    model = _field(data, "model", str, "default")
    messages = _messages(data) if kind == "chat" else None
    prompt = None
    if kind == "text":
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    if _field(data, "n", int, 1, minimum=1, maximum=1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = _field(data, "max_completion_tokens", int, None, minimum=1)
    max_tokens = _field(data, "max_tokens", int, max_tokens, minimum=1)
    stream_options = _field(data, "stream_options", dict, {})
    params = SamplingParams(
        max_tokens=max_tokens or 1,  # replaced by the server once the prompt length is known
        temperature=float(_field(data, "temperature", (int, float), 1.0, minimum=0, maximum=2)),
        top_p=float(_field(data, "top_p", (int, float), 1.0, minimum=0, maximum=1)),
        top_k=_field(data, "top_k", int, 0, minimum=0),
        min_p=float(_field(data, "min_p", (int, float), 0.0, minimum=0, maximum=1)),
        repeat_penalty=float(_field(data, "repeat_penalty", (int, float), 1.0, minimum=0.01)),
        seed=_field(data, "seed", int, None),
        stop=_stop(data),
    )
    return CompletionRequest(
        kind=kind, model=model, messages=messages, prompt=prompt, max_tokens=max_tokens, params=params,
        stream=_field(data, "stream", bool, False),
        include_usage=bool(stream_options.get("include_usage", False)) if stream_options else False,
    )


# -- responses --------------------------------------------------------------------------------

def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(stats: GenerationStats | None, prompt_tokens: int) -> dict[str, int]:
    completion = stats.gen_tokens if stats else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def completion_body(req: CompletionRequest, rid: str, model_id: str, text: str, finish: str,
                    usage_: dict[str, int]) -> dict[str, Any]:
    """The non-streaming response."""
    if req.kind == "chat":
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id,
            "choices": [choice], "usage": usage_}


def chunk_body(req: CompletionRequest, rid: str, model_id: str, *, text: str | None = None,
               role: bool = False, finish: str | None = None) -> dict[str, Any]:
    """One streamed chunk (a delta of text, the opening role, or the finish reason)."""
    if req.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
            delta["content"] = ""
        if text:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [choice]}


def usage_chunk(req: CompletionRequest, rid: str, model_id: str, usage_: dict[str, int]) -> dict[str, Any]:
    obj = "chat.completion.chunk" if req.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model_id, "choices": [],
            "usage": usage_}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
