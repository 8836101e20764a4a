"""Every field of OpenAI's chat and completion requests, and what this server does with each.

The table is the one place that decides: ``IMPLEMENTED`` fields are read and acted on
(``openai_requests``); ``DESCRIBES_CLIENT`` fields say who the client is or how it bills, logs or
caches, and are accepted with nothing to do; ``REFUSED`` fields get a 400 naming them, unless
their value asks for nothing (null, or what ``accepts`` allows: ``n: 1``, ``modalities:
["text"]``). A field the table does not name is refused too: nothing a client sends is dropped
without a word. The list follows openai-python 3.x's ``completion_create_params`` and adds the
sampling knobs local servers take (``top_k``, ``min_p``, ``repeat_penalty``,
``repetition_penalty``).

Messages are the exception, on purpose: SDKs send back every key of a message a server returned
(``refusal``, ``annotations``, ``parsed``, ``reasoning_content`` ...), so a message's keys other
than ``MESSAGE_KEYS_READ`` are accepted and not read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge_runtime.server.wire import ApiError

IMPLEMENTED = "implemented"
DESCRIBES_CLIENT = "accepted: describes the client"
REFUSED = "refused"


@dataclass(frozen=True)
class FieldRule:
    """What happens to one request field; ``note`` says why a refused one is, or what it does."""

    handling: str
    note: str = ""
    accepts: Callable[[Any], bool] | None = None  # values of a refused field that ask for nothing


def _done(note: str = "") -> FieldRule:
    return FieldRule(IMPLEMENTED, note)


def _client(note: str = "") -> FieldRule:
    return FieldRule(DESCRIBES_CLIENT, note)


def _refused(note: str, accepts: Callable[[Any], bool] | None = None) -> FieldRule:
    return FieldRule(REFUSED, note, accepts)


_BOTH: dict[str, FieldRule] = {
    "model": _done("the served id or 'default'"),
    "stream": _done(), "stream_options": _done("include_usage; include_obfuscation is accepted"),
    "max_tokens": _done(), "temperature": _done(), "top_p": _done(), "top_k": _done(), "min_p": _done(),
    "repeat_penalty": _done(), "repetition_penalty": _done("the same as repeat_penalty"),
    "presence_penalty": _done(), "frequency_penalty": _done(), "logit_bias": _done(), "seed": _done(),
    "stop": _done(), "response_format": _done("text, json_object, json_schema: the answer always parses"),
    "logprobs": _done(),
    "n": _refused("this server makes one choice per request", lambda v: v == 1),
    "user": _client(), "metadata": _client(), "store": _client("nothing is stored"),
    "service_tier": _client(), "safety_identifier": _client(),
}

CHAT_FIELDS: dict[str, FieldRule] = {
    **_BOTH,
    "messages": _done(), "max_completion_tokens": _done(), "top_logprobs": _done(),
    "tools": _done("type function"), "tool_choice": _done("none, auto, required or a named function"),
    "parallel_tool_calls": _done(),
    "prompt_cache_key": _client("the prompt cache is automatic"), "prompt_cache_retention": _client(),
    "prompt_cache_options": _client(), "verbosity": _client("a hint; the answer's length is max_tokens'"),
    "reasoning_effort": _refused("the models served here do not reason; send none or minimal",
                                 lambda v: v in ("none", "minimal")),
    "modalities": _refused("this server answers text only", lambda v: v == ["text"]),
    "audio": _refused("this server answers text only"),
    "prediction": _refused("predicted outputs are not supported"),
    "web_search_options": _refused("this server searches nothing: it runs offline"),
    "moderation": _refused("this server runs no moderation model"),
    "functions": _refused("deprecated by OpenAI; send 'tools'"),
    "function_call": _refused("deprecated by OpenAI; send 'tool_choice'"),
}

COMPLETION_FIELDS: dict[str, FieldRule] = {
    **_BOTH,
    "prompt": _done(),
    "echo": _refused("the prompt is not echoed", lambda v: v is False),
    "suffix": _refused("fill-in-the-middle is not supported", lambda v: v == ""),
    "best_of": _refused("this server makes one choice per request", lambda v: v == 1),
}

STREAM_OPTIONS: dict[str, FieldRule] = {
    "include_usage": _done(), "include_obfuscation": _client("chunks are not padded"),
}

# The keys of a message that are read; every other key is accepted (see above).
MESSAGE_KEYS_READ = ("role", "content", "tool_calls", "tool_call_id", "name")


def check_fields(data: dict[str, Any], table: dict[str, FieldRule], where: str, prefix: str = "") -> None:
    """Refuse (400, naming it) a field ``table`` refuses or does not know; ``where`` names the request."""
    for name, value in data.items():
        rule = table.get(name)
        param = prefix + name
        if rule is None:
            raise ApiError(400, f"'{param}' is not a field of {where} that this server knows",
                           param=param, code="unknown_parameter")
        if rule.handling == REFUSED and value is not None and not (rule.accepts and rule.accepts(value)):
            raise ApiError(400, f"'{param}' is not supported: {rule.note}", param=param,
                           code="unsupported_parameter")
