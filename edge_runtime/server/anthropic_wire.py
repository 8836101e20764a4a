"""Anthropic's Messages API bodies as a ``GenerationRequest``, and its answers and stream events.

Which request fields exist is the table below, as OpenAI's side does (``openai_fields``):
implemented ones are read, ones that describe the client are accepted with nothing to do, the
rest get a 400 naming them. History blocks: ``text``, ``tool_use`` (assistant), ``tool_result``
(user), ``thinking`` (dropped: the models served here do not reason); others are a 400.
``usage.input_tokens`` counts the whole prompt: the KV cache is reused automatically, and the
cache fields stay 0. With ``stop_sequences`` the generated tokens' texts are kept (as logprobs
are), since the answer's text leaves the matched sequence out and ``stop_sequence`` names it.
"""

from __future__ import annotations

import json
from typing import Any

from edge_runtime.backends.base import SamplingParams
from edge_runtime.errors import InvalidRequestError
from edge_runtime.limits import MAX_C_INT
from edge_runtime.server.openai_fields import DESCRIBES_CLIENT, IMPLEMENTED, REFUSED, FieldRule, check_fields
from edge_runtime.server.requests import (
    Answer,
    Finished,
    GenerationRequest,
    Message,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolUse,
)
from edge_runtime.server.wire import ApiError, field_value

_DONE, _CLIENT = FieldRule(IMPLEMENTED), FieldRule(DESCRIBES_CLIENT)
# One table for /v1/messages and count_tokens (which ignores the fields about the answer).
MESSAGE_FIELDS: dict[str, FieldRule] = {
    "model": _DONE, "messages": _DONE, "system": _DONE, "tools": _DONE, "tool_choice": _DONE,
    "output_config": _DONE, "max_tokens": _DONE, "stream": _DONE, "stop_sequences": _DONE, "temperature": _DONE,
    "top_p": _DONE, "top_k": _DONE,
    "thinking": FieldRule(REFUSED, "the models served here do not reason", lambda v: v == {"type": "disabled"}),
    "cache_control": _CLIENT, "metadata": _CLIENT, "service_tier": _CLIENT, "container": _CLIENT,
    "inference_geo": _CLIENT, "speed": _CLIENT, "diagnostics": _CLIENT, "user_profile_id": _CLIENT,
    "workspace_id": _CLIENT,  # anthropic 2.x: an account's tier, region, attribution, cache diagnostics
}
_STOP_REASONS = {"stop": "end_turn", "cancelled": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error"}


def error_body(error: ApiError) -> dict[str, Any]:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = _ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def parse_messages(data: dict[str, Any], *, counting: bool = False) -> GenerationRequest:
    """A /v1/messages body (or, ``counting``, a /v1/messages/count_tokens one) as a ``GenerationRequest``."""
    check_fields(data, MESSAGE_FIELDS, "a messages request")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model: Field required")
    max_tokens = None
    if not counting:
        if data.get("max_tokens") is None:
            raise ApiError(400, "max_tokens: Field required")
        max_tokens = field_value(data, "max_tokens", int, minimum=1, maximum=MAX_C_INT)
    messages = (*_system(data.get("system")), *_messages(data.get("messages")))
    stop = field_value(data, "stop_sequences", list, [])
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop_sequences: must be an array of strings")
    try:
        params = SamplingParams(
            max_tokens=1, temperature=float(field_value(data, "temperature", (int, float), 1.0, minimum=0, maximum=1)),
            top_p=float(field_value(data, "top_p", (int, float), 1.0, minimum=0, maximum=1)),
            top_k=field_value(data, "top_k", int, 0, minimum=0, maximum=MAX_C_INT), min_p=0.0,
            stop=tuple(s for s in stop if s), json_schema=_output_schema(data.get("output_config")),
            # The tokens' texts tell which stop sequence ended the answer (the text shown leaves it out).
            logprobs=0 if any(stop) else None)
    except InvalidRequestError as exc:
        raise ApiError(400, exc.message) from None
    return GenerationRequest(kind="chat", model=model, params=params, messages=messages, max_tokens=max_tokens,
                             tools=_tool_use(data), stream=bool(field_value(data, "stream", bool, False)))


def _system(value: Any) -> tuple[Message, ...]:
    if value is None:
        return ()
    text = _text_blocks(value, "system") if isinstance(value, list) else value
    if not isinstance(text, str):
        raise ApiError(400, "system: must be a string or an array of text blocks")
    return (Message("system", text),) if text else ()


def _text_blocks(blocks: list[Any], where: str) -> str:
    texts = []
    for i, block in enumerate(blocks):
        if not (isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)):
            raise ApiError(400, f"{where}.{i}: only text blocks are supported here")
        texts.append(block["text"])
    return "".join(texts)


def _messages(raw: Any) -> list[Message]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "messages: must be a non-empty array")
    out: list[Message] = []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    for i, message in enumerate(raw):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise ApiError(400, f"{where}.role: must be user or assistant")
        assert isinstance(message, dict)
        content = message.get("content")
        if isinstance(content, str):
            out.append(Message(role, content))
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content: must be a string or an array of content blocks")
        texts, calls = [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            place = f"{where}.content.{j}"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            elif kind == "tool_use" and role == "assistant":
                call = _history_call(block, place)
                names[call.id] = call.name
                calls.append(call)
            elif kind == "tool_result" and role == "user":
                call_id = block.get("tool_use_id")
                if not isinstance(call_id, str):
                    raise ApiError(400, f"{place}.tool_use_id: Field required")
                result = block.get("content", "")
                text = _text_blocks(result, f"{place}.content") if isinstance(result, list) else result
                if not isinstance(text, str):
                    raise ApiError(400, f"{place}.content: must be a string or text blocks")
                out.append(Message("tool", text, tool_call_id=call_id, name=names.get(call_id)))
            else:
                raise ApiError(400, f"{place}: {kind!r} blocks are not supported in {role} messages here")
        if texts or calls or not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in content):
            out.append(Message(role, "".join(texts), tuple(calls)))
    if out[-1].role == "assistant":
        raise ApiError(400, "messages: a final assistant message (prefill) is not supported by this server")
    return out


def _history_call(block: dict[str, Any], place: str) -> ToolCall:
    call_id, name, arguments = block.get("id"), block.get("name"), block.get("input", {})
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, dict):
        raise ApiError(400, f"{place}: a tool_use block needs an id, a name and an input object")
    return ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False))


def _output_schema(config: Any) -> dict[str, Any] | None:
    """``output_config.format`` (``json_schema``) as the schema the answer must follow."""
    if config is None:
        return None
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        return None
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict)):
        raise ApiError(400, 'output_config.format: must be {"type": "json_schema", "schema": {...}}')
    return fmt["schema"]


def _tool_use(data: dict[str, Any]) -> ToolUse | None:
    raw, choice = data.get("tools"), data.get("tool_choice")
    if not raw:
        if choice is not None and not (isinstance(choice, dict) and choice.get("type") == "none"):
            raise ApiError(400, "tool_choice: needs tools")
        return None
    if not isinstance(raw, list):
        raise ApiError(400, "tools: must be an array")
    tools = []
    for i, tool in enumerate(raw):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
            raise ApiError(400, f"tools.{i}: only custom tools (with an input_schema) are supported; "
                                "this server runs offline and has no server tools")
        name, schema, description = tool.get("name"), tool.get("input_schema"), tool.get("description")
        if not isinstance(name, str) or not isinstance(schema, dict):
            raise ApiError(400, f"tools.{i}: needs a name and an input_schema object")
        tools.append(Tool(name, description if isinstance(description, str) else None, schema))
    if choice is None:
        return ToolUse(tuple(tools))
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind not in ("auto", "any", "tool", "none"):
        raise ApiError(400, "tool_choice.type: must be auto, any, tool or none")
    assert isinstance(choice, dict)
    parallel = not field_value(choice, "disable_parallel_tool_use", bool, False)
    if kind == "tool":
        if choice.get("name") not in {t.name for t in tools}:
            raise ApiError(400, f"tool_choice.name: {choice.get('name')!r} is not in tools")
        return ToolUse(tuple(tools), "function", choice["name"], parallel)
    return ToolUse(tuple(tools), {"any": "required"}.get(kind, kind), None, parallel)


# -- answers -----------------------------------------------------------------------------------

def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {"input_tokens": input_tokens, "output_tokens": output_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0}


def stop_reason(finished: Finished) -> str:
    return _STOP_REASONS.get(finished.reason, "end_turn")


def matched_stop(req: GenerationRequest, finished: Finished, tokens: list[TokenLogprob]) -> str | None:
    """The stop sequence that ended the answer, if one did: the first one found in the tokens' text."""
    if finished.reason != "stop" or not req.params.stop or req.params.constrained:
        return None
    generated = b"".join(t.raw for t in tokens).decode("utf-8", errors="replace")
    hits = [(generated.find(s), s) for s in req.params.stop if s in generated]
    return min(hits)[1] if hits else None


def tool_input(arguments: str) -> Any:
    """A call's arguments as the ``input`` object (a call cut short by max_tokens stays text)."""
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return {"_unparsed": arguments}


def message_body(rid: str, req: GenerationRequest, answer: Answer) -> dict[str, Any]:
    """The whole answer of a non-streaming request."""
    finished = answer.finished
    assert finished is not None
    stop = matched_stop(req, finished, answer.logprobs)
    content: list[dict[str, Any]] = [{"type": "text", "text": answer.text}] if answer.text else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": tool_input(c.arguments)}
                for c in answer.tool_calls]
    return {"id": rid, "type": "message", "role": "assistant", "model": req.model, "content": content,
            "stop_reason": "stop_sequence" if stop else stop_reason(finished), "stop_sequence": stop,
            "usage": usage(finished.prompt_tokens, finished.completion_tokens)}
