"""OpenAI's /v1/chat/completions and /v1/completions bodies, checked and turned into a ``GenerationRequest``.

Every problem raises a 400 ``ApiError`` naming the field. Which fields exist and which are
refused is ``openai_fields``' table; this module reads the implemented ones.
"""

from __future__ import annotations

import json
import re
from typing import Any

from edge_runtime.backends.base import SamplingParams
from edge_runtime.backends.params import MAX_TOP_LOGPROBS
from edge_runtime.errors import InvalidRequestError
from edge_runtime.limits import MAX_C_INT, MAX_REPEAT_PENALTY, MAX_SEED
from edge_runtime.server.openai_fields import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    MESSAGE_KEYS_READ,
    STREAM_OPTIONS,
    check_fields,
)
from edge_runtime.server.requests import GenerationRequest, Message, Tool, ToolCall, ToolUse
from edge_runtime.server.wire import ApiError, field_value, stop_strings

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit on /v1/completions' logprobs
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
CONTENT_ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_chat_request(data: dict[str, Any]) -> GenerationRequest:
    """A /v1/chat/completions body as a ``GenerationRequest``."""
    _check_n(data)
    check_fields(data, CHAT_FIELDS, "a chat completion request")
    messages = _messages(data.get("messages"))
    if data.get("top_logprobs") is not None and data.get("logprobs") is not True:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = None
    if field_value(data, "logprobs", bool, False):
        logprobs = field_value(data, "top_logprobs", int, 0, minimum=0, maximum=MAX_TOP_LOGPROBS)
    max_tokens = field_value(data, "max_completion_tokens", int, None, minimum=1, maximum=MAX_C_INT)
    return GenerationRequest(
        kind="chat", model=field_value(data, "model", str, "default"), messages=messages,
        params=_params(data, logprobs, max_tokens), max_tokens=_max_tokens(data, max_tokens),
        tools=_tool_use(data), stream=_stream(data))


def parse_completion_request(data: dict[str, Any]) -> GenerationRequest:
    """A /v1/completions body as a ``GenerationRequest``."""
    _check_n(data)
    check_fields(data, COMPLETION_FIELDS, "a completion request")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    logprobs = field_value(data, "logprobs", int, None, minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
    return GenerationRequest(
        kind="text", model=field_value(data, "model", str, "default"), prompt=prompt,
        params=_params(data, logprobs, None), max_tokens=_max_tokens(data, None), stream=_stream(data))


def include_usage(data: dict[str, Any]) -> bool:
    """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
    options = field_value(data, "stream_options", dict, {})
    return bool(field_value(options, "include_usage", bool, False, param="stream_options.include_usage"))


def _check_n(data: dict[str, Any]) -> None:
    field_value(data, "n", int, 1, minimum=1)  # its range first; the table then refuses n > 1


def _stream(data: dict[str, Any]) -> bool:
    options = field_value(data, "stream_options", dict, {})
    check_fields(options, STREAM_OPTIONS, "stream_options", "stream_options.")
    return bool(field_value(data, "stream", bool, False))


def _max_tokens(data: dict[str, Any], chat_max: int | None) -> int | None:
    return field_value(data, "max_tokens", int, chat_max, minimum=1, maximum=MAX_C_INT)


def _params(data: dict[str, Any], logprobs: int | None, chat_max: int | None) -> SamplingParams:
    """The sampling fields as ``SamplingParams`` (``max_tokens`` is set once the prompt is measured)."""
    number = (int, float)
    repeat = field_value(data, "repetition_penalty", number, 1.0, minimum=0.01, maximum=MAX_REPEAT_PENALTY)
    try:
        return SamplingParams(
            max_tokens=1,
            temperature=float(field_value(data, "temperature", number, 1.0, minimum=0, maximum=2)),
            top_p=float(field_value(data, "top_p", number, 1.0, minimum=0, maximum=1)),
            top_k=field_value(data, "top_k", int, 0, minimum=0, maximum=MAX_C_INT),
            min_p=float(field_value(data, "min_p", number, 0.0, minimum=0, maximum=1)),
            repeat_penalty=float(field_value(data, "repeat_penalty", number, repeat, minimum=0.01,
                                             maximum=MAX_REPEAT_PENALTY)),
            presence_penalty=float(field_value(data, "presence_penalty", number, 0.0, minimum=-2, maximum=2)),
            frequency_penalty=float(field_value(data, "frequency_penalty", number, 0.0, minimum=-2, maximum=2)),
            logit_bias=_logit_bias(data),
            seed=field_value(data, "seed", int, None, minimum=0, maximum=MAX_SEED),
            stop=stop_strings(data),
            logprobs=logprobs,
            json_schema=_response_schema(data.get("response_format")),
        )
    except InvalidRequestError as exc:  # what the backends' own checks refuse beyond the ones above
        raise ApiError(400, exc.message) from None


def _logit_bias(data: dict[str, Any]) -> dict[int, float] | None:
    """OpenAI's ``{"<token id>": bias}`` (ids are JSON object keys, so strings) as ``{id: bias}``."""
    bias = field_value(data, "logit_bias", dict, None)
    if not bias:
        return None
    out = {}
    for key in bias:
        if not (isinstance(key, str) and key.isdigit() and int(key) <= MAX_C_INT):
            raise ApiError(400, f"'logit_bias' keys must be token ids, not {key!r}", param="logit_bias")
        out[int(key)] = float(field_value(bias, key, (int, float), minimum=-100, maximum=100,
                                          param=f"logit_bias.{key}"))
    return out


def _response_schema(value: Any) -> dict[str, Any] | None:
    """``response_format`` as the JSON Schema the answer must follow (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ApiError(400, "'response_format.type' must be text, json_object or json_schema",
                       param="response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ApiError(400, "'response_format.json_schema' needs a 'name'", param="response_format.json_schema")
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise ApiError(400, "'response_format.json_schema.schema' must be an object",
                       param="response_format.json_schema.schema")
    if spec.get("strict") is not True and "x-guidance" not in schema:
        from edge_runtime.backends.constraints import JSON_WHITESPACE

        # Not strict: keywords the grammar cannot enforce are let through rather than refused.
        schema = {**schema, "x-guidance": {"lenient": True, "whitespace_pattern": JSON_WHITESPACE}}
    return schema


def _text(content: Any, where: str, *, none_ok: bool = False) -> str:
    """A message's content as text: a string, or text (and refusal) parts; nothing else."""
    if content is None and none_ok:
        return ""
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            text = part.get(kind) if kind in ("text", "refusal") else None
            if not isinstance(text, str):
                shown = f"'{kind}' parts" if isinstance(kind, str) else "parts that are not text"
                raise ApiError(400, f"{where}[{i}]: {shown} are not supported; this server reads text",
                               param=f"{where}[{i}]", code="unsupported_parameter")
            texts.append(text)
        return "".join(texts)
    if not isinstance(content, str):
        raise ApiError(400, f"{where} must be a string or an array of text parts", param=where)
    return content


def _messages(raw: Any) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CONTENT_ROLES:
            raise ApiError(400, f"{where} needs a role of system, developer, user, assistant or tool", param=where)
        assert isinstance(message, dict)
        read = {k: message.get(k) for k in MESSAGE_KEYS_READ}
        calls = _history_calls(read["tool_calls"], where) if role == "assistant" else ()
        content = _text(read["content"], f"{where}.content", none_ok=role == "assistant")
        if role == "tool":
            call_id = read["tool_call_id"]
            if not isinstance(call_id, str):
                raise ApiError(400, f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")
            name = read["name"] if isinstance(read["name"], str) else None
            out.append(Message("tool", content, tool_call_id=call_id, name=name))
        else:
            out.append(Message("system" if role == "developer" else role, content, calls))
    return tuple(out)


def _history_calls(raw: Any, where: str) -> tuple[ToolCall, ...]:
    """An assistant message's earlier ``tool_calls``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ApiError(400, f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ApiError(400, f"{where}.tool_calls[{j}] needs a function with a name",
                           param=f"{where}.tool_calls[{j}]")
        arguments = function.get("arguments", "{}")
        if not isinstance(arguments, str):  # some clients send the object itself
            arguments = json.dumps(arguments, ensure_ascii=False)
        call_id = call.get("id")
        calls.append(ToolCall(call_id if isinstance(call_id, str) else "", function["name"], arguments))
    return tuple(calls)


def _tool_use(data: dict[str, Any]) -> ToolUse | None:
    raw, choice = data.get("tools"), data.get("tool_choice")
    if not raw:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(raw, list):
        raise ApiError(400, "'tools' must be an array", param="tools")
    tools = tuple(_tool(item, f"tools[{i}]") for i, item in enumerate(raw))
    if len({t.name for t in tools}) != len(tools):
        raise ApiError(400, "'tools' names a function twice", param="tools")
    parallel = bool(field_value(data, "parallel_tool_calls", bool, True))
    if choice is None or choice in ("none", "auto", "required"):
        return ToolUse(tools, choice or "auto", None, parallel)
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "'tool_choice' must be none, auto, required or "
                            '{"type": "function", "function": {"name": ...}}', param="tool_choice",
                       code="unsupported_parameter")
    if name not in {t.name for t in tools}:
        raise ApiError(400, f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice")
    return ToolUse(tools, "function", name, parallel)


def _tool(item: Any, where: str) -> Tool:
    if not isinstance(item, dict) or item.get("type") != "function":
        raise ApiError(400, f"{where}: only tools of type 'function' are supported", param=where,
                       code="unsupported_parameter")
    function = item.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not TOOL_NAME.match(name):
        raise ApiError(400, f"{where}.function.name must be 1 to 64 letters, digits, _ or -",
                       param=f"{where}.function.name")
    assert isinstance(function, dict)
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ApiError(400, f"{where}.function.parameters must be a JSON Schema of an object",
                       param=f"{where}.function.parameters")
    description = function.get("description")
    return Tool(name, description if isinstance(description, str) else None, parameters)
