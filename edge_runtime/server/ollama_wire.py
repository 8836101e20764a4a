"""Ollama's /api/chat and /api/generate bodies as a ``GenerationRequest``, and its answers' objects.

Ollama's own rules: ``stream`` is true unless the body says false; ``options`` carries the
sampling knobs (unknown and retired keys are logged and ignored, as Ollama does; a wrong type is
a 400); ``format`` is ``"json"`` or a JSON Schema; tool-call arguments are objects, not text.
The durations of the last object are integer nanoseconds from the generation's own stats:
``prompt_eval_count`` counts the prompt tokens this request evaluated, so tokens reused from the
KV cache are not in it (Ollama counts the same way), and ``eval_duration`` runs from the end of
the prompt pass to the last token.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from edge_runtime.backends.base import ModelInfo, SamplingParams
from edge_runtime.backends.params import MAX_TOP_LOGPROBS
from edge_runtime.errors import InvalidRequestError
from edge_runtime.limits import MAX_C_INT, MAX_REPEAT_PENALTY, MAX_SEED
from edge_runtime.server.requests import (
    Finished,
    GenerationRequest,
    Message,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolUse,
)
from edge_runtime.server.wire import ApiError, field_value, logprob_entry, new_id

log = logging.getLogger("edgert.server")

OLLAMA_VERSION = "0.12.6"  # the Ollama release whose API this follows (think, tool streaming)
# Options Ollama reads at load time or has retired: accepted, logged, ignored.
_IGNORED_OPTIONS = frozenset({
    "num_keep", "typical_p", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread", "draft_num_predict",
    "numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock", "embedding_only", "tfs_z",
    "mirostat", "mirostat_tau", "mirostat_eta", "penalize_newline"})
_NUMBER = (int, float)


def served_name(model_id: str) -> str:
    """The served id as Ollama names models: ``name:tag`` (``:latest`` when the id has no tag)."""
    return model_id if ":" in model_id else f"{model_id}:latest"


def check_model(name: Any, model_id: str) -> str:
    """``name`` if it names the served model (with or without ``:latest``, or ``default``); else 404."""
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required")
    if name in (model_id, served_name(model_id), "default", "default:latest"):
        return name
    raise ApiError(404, f"model '{name}' not found")


def created_at() -> str:
    """Now in UTC, as Ollama writes times (RFC 3339 with a Z)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def streams(data: dict[str, Any]) -> bool:
    """Ollama streams unless told ``"stream": false``."""
    return bool(field_value(data, "stream", bool, True))


def parse_chat(data: dict[str, Any]) -> GenerationRequest:
    """An /api/chat body (its ``messages`` non-empty) as a ``GenerationRequest``."""
    raw = data.get("messages")
    if not isinstance(raw, list):
        raise ApiError(400, "'messages' must be an array")
    messages = tuple(_message(m, f"messages[{i}]") for i, m in enumerate(raw))
    max_tokens, params = _params(data)
    return GenerationRequest(kind="chat", model=data["model"], params=params, messages=messages,
                             max_tokens=max_tokens, tools=_tools(data.get("tools")), stream=streams(data))


def parse_generate(data: dict[str, Any]) -> GenerationRequest:
    """An /api/generate body (its ``prompt`` non-empty) as a ``GenerationRequest``.

    Without ``raw`` the prompt goes through the chat template as a user turn (after ``system``),
    as Ollama's template does; with ``raw`` it is the prompt as it is.
    """
    for name in ("suffix", "template", "context", "images"):
        if data.get(name):
            raise ApiError(400, f"'{name}' is not supported by this server")
    prompt = field_value(data, "prompt", str, "")
    system = field_value(data, "system", str, "")
    max_tokens, params = _params(data)
    if field_value(data, "raw", bool, False):
        if system:
            raise ApiError(400, "raw mode does not support template, system, or context")
        return GenerationRequest(kind="text", model=data["model"], params=params, prompt=prompt,
                                 max_tokens=max_tokens, stream=streams(data))
    messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
    return GenerationRequest(kind="chat", model=data["model"], params=params, messages=messages,
                             max_tokens=max_tokens, stream=streams(data))


def _message(raw: Any, where: str) -> Message:
    role = raw.get("role") if isinstance(raw, dict) else None
    if not isinstance(role, str) or role.lower() not in ("system", "user", "assistant", "tool"):
        raise ApiError(400, f"{where} needs a role of system, user, assistant or tool")
    assert isinstance(raw, dict)
    if raw.get("images"):
        raise ApiError(400, f"{where}: images are not supported; this server reads text")
    content = field_value(raw, "content", str, "", param=f"{where}.content")  # the client drops empty ones
    role = role.lower()
    if role == "tool":
        name = raw.get("tool_name") if isinstance(raw.get("tool_name"), str) else None
        call_id = raw.get("tool_call_id") if isinstance(raw.get("tool_call_id"), str) else ""
        return Message("tool", content, tool_call_id=call_id, name=name)
    calls = []
    for j, call in enumerate(field_value(raw, "tool_calls", list, [], param=f"{where}.tool_calls")):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ApiError(400, f"{where}.tool_calls[{j}] needs a function with a name")
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        call_id = call.get("id") if isinstance(call.get("id"), str) else ""
        calls.append(ToolCall(call_id, function["name"], text))
    return Message(role, content, tuple(calls))


def _tools(raw: Any) -> ToolUse | None:
    """Ollama's ``tools`` (OpenAI's function shape); the model decides whether to call."""
    if not raw:
        return None
    if not isinstance(raw, list):
        raise ApiError(400, "'tools' must be an array")
    tools = []
    for i, item in enumerate(raw):
        function = item.get("function") if isinstance(item, dict) else None
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise ApiError(400, f"tools[{i}] needs a function with a name")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be an object")
        description = function.get("description") if isinstance(function.get("description"), str) else None
        tools.append(Tool(function["name"], description, parameters))
    return ToolUse(tuple(tools))


def _params(data: dict[str, Any]) -> tuple[int | None, SamplingParams]:
    """``options`` and ``format`` as (max_tokens, ``SamplingParams``), with Ollama's defaults."""
    if data.get("think") not in (None, False):
        raise ApiError(400, f'"{data["model"]}" does not support thinking')
    logprobs = None  # Ollama 0.12's logprobs: the chosen token's, and top_logprobs (0..20) alternatives
    if field_value(data, "logprobs", bool, False):
        logprobs = field_value(data, "top_logprobs", int, 0, minimum=0, maximum=MAX_TOP_LOGPROBS)
    elif data.get("top_logprobs"):
        raise ApiError(400, "top_logprobs needs logprobs: true")
    options = field_value(data, "options", dict, {})
    for name in options:
        if name in _IGNORED_OPTIONS or name not in _OPTION_NAMES:
            log.warning("ollama request: option %r is not used by this server; ignored", name)
    if "num_ctx" in options:
        field_value(options, "num_ctx", int, None, minimum=1, param="options.num_ctx")  # the context is the plan's

    def option(name: str, types: type | tuple[type, ...], default: Any, **bounds: float) -> Any:
        return field_value(options, name, types, default, param=f"options.{name}", **bounds)

    predict = option("num_predict", int, -1, minimum=-2, maximum=MAX_C_INT)
    seed = option("seed", int, -1, minimum=-1, maximum=MAX_SEED)
    stop = option("stop", (list, str), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'options.stop' must be an array of strings")
    try:
        params = SamplingParams(
            max_tokens=1,
            temperature=float(option("temperature", _NUMBER, 0.8, minimum=0, maximum=2)),
            top_k=option("top_k", int, 40, minimum=0, maximum=MAX_C_INT),
            top_p=float(option("top_p", _NUMBER, 0.9, minimum=0, maximum=1)),
            min_p=float(option("min_p", _NUMBER, 0.0, minimum=0, maximum=1)),
            repeat_penalty=float(option("repeat_penalty", _NUMBER, 1.0, minimum=0.01, maximum=MAX_REPEAT_PENALTY)),
            repeat_last_n=option("repeat_last_n", int, 64, minimum=-1, maximum=MAX_C_INT),
            presence_penalty=float(option("presence_penalty", _NUMBER, 0.0, minimum=-2, maximum=2)),
            frequency_penalty=float(option("frequency_penalty", _NUMBER, 0.0, minimum=-2, maximum=2)),
            seed=None if seed < 0 else seed,
            stop=tuple(s for s in stop if s),
            json_schema=_format(data.get("format")),
            logprobs=logprobs,
        )
    except InvalidRequestError as exc:  # what the backends' own checks refuse beyond the ones above
        raise ApiError(400, exc.message) from None
    return (predict if predict > 0 else None), params


_OPTION_NAMES = frozenset({"num_ctx", "num_predict", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                           "repeat_penalty", "presence_penalty", "frequency_penalty", "repeat_last_n"})


def _format(value: Any) -> dict[str, Any] | None:
    """``format``: ``"json"`` (any object) or a JSON Schema the answer must follow."""
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "object"}
    if isinstance(value, dict):
        return value
    raise ApiError(400, f'invalid format: {json.dumps(value)}; expected "json" or a valid JSON Schema object')


# -- answers -----------------------------------------------------------------------------------

def ollama_calls(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """Tool calls in Ollama's shape: arguments as an object, ``function.index`` counting from 0."""
    out = []
    for i, call in enumerate(calls):
        try:
            arguments = json.loads(call.arguments or "{}")
        except json.JSONDecodeError:  # a call cut short by num_predict: its text is all there is
            arguments = {"_unparsed": call.arguments}
        out.append({"id": call.id or new_id("call_", 8), "function": {"index": i, "name": call.name,
                                                                        "arguments": arguments}})
    return out


def ollama_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    """Logprobs in Ollama's shape: ``[{"token", "logprob", "bytes", "top_logprobs": [...]}]``."""
    return [logprob_entry(t) for t in items]


def final_fields(finished: Finished, total_s: float) -> dict[str, Any]:
    """What the last object adds: ``done_reason`` and the counts and durations (nanoseconds)."""
    out: dict[str, Any] = {"done": True, "done_reason": "length" if finished.reason == "length" else "stop",
                           "total_duration": int(total_s * 1e9)}
    stats = finished.stats
    if stats is not None:
        first_token_s = max(stats.ttft_s - stats.prefill_s, 0.0)  # sampling the first token
        out.update(prompt_eval_count=stats.evaluated_tokens, prompt_eval_duration=int(stats.prefill_s * 1e9),
                   eval_count=stats.gen_tokens, eval_duration=int((first_token_s + stats.decode_s) * 1e9))
    else:
        out.update(prompt_eval_count=finished.prompt_tokens, eval_count=finished.completion_tokens)
    return out


def parameter_size(n_params: int) -> str:
    """``135M``, ``1.2B``: Ollama's way of writing a parameter count."""
    if n_params >= 10**9:
        return f"{n_params / 1e9:.1f}B"
    return f"{n_params / 1e6:.0f}M" if n_params >= 10**6 else str(n_params)


def model_details(info: ModelInfo, file_format: str) -> dict[str, Any]:
    """The ``details`` object of /api/tags, /api/show and /api/ps."""
    return {"parent_model": "", "format": file_format, "family": info.arch, "families": [info.arch],
            "parameter_size": parameter_size(info.n_params), "quantization_level": info.quant or ""}
