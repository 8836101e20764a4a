"""What every wire format shares: the JSON body, field checks, errors, ids, usage and SSE framing.

Every problem with a request becomes an ``ApiError`` carrying its HTTP status and an
OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``; another wire format
renders the same error in its own shape. The OpenAI requests and answers themselves are in
``openai_requests`` and ``openai_responses``.
"""

from __future__ import annotations

import json
import math
import secrets
import string
from typing import TYPE_CHECKING, Any

from edge_runtime.files import json_depth
from edge_runtime.limits import MAX_JSON_DEPTH

if TYPE_CHECKING:
    from edge_runtime.server.requests import TokenLogprob

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


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; anything else is a 400, never a crash.

    The nesting depth is measured before ``json.loads`` sees the body: its scanner recurses, and
    100,000 nested brackets would end in a ``RecursionError``. Lone UTF-16 surrogates are refused
    here too; ``NaN`` and ``Infinity`` parse, and the field holding one refuses it by name.
    """
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the body nests {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted",
                       code="body_too_deep")
    try:
        data = json.loads(raw)  # NaN and Infinity parse; the field that holds one says so below
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except ValueError:  # an integer past Python's limit on digits
        raise ApiError(400, "the body is not valid JSON: a number has too many digits") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:  # a lone surrogate ("\\ud800") parses, then breaks whatever encodes it to UTF-8 later
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the body holds a lone UTF-16 surrogate escape, which is not valid Unicode") from None
    return data


def logprob_entry(item: TokenLogprob) -> dict[str, Any]:
    """One token's logprob as OpenAI and Ollama write it: its text, logprob, bytes and alternatives."""
    return {"token": item.token, "logprob": item.logprob, "bytes": list(item.raw),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in item.top]}


def field_value(data: dict[str, Any], name: str, types: type | tuple[type, ...], default: Any = None,
                *, minimum: float | None = None, maximum: float | None = None, param: str | None = None) -> Any:
    """``data[name]`` checked for type, finiteness and range (``default`` when absent or null).

    A bad value raises a 400 ``ApiError`` naming ``param`` (``name`` unless given).
    """
    value = data.get(name, default)
    if value is None:
        return default
    name = param or name
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ApiError(400, f"'{name}' must be {_type_name(types)}", param=name)
    if not isinstance(value, types):
        raise ApiError(400, f"'{name}' must be {_type_name(types)}", param=name)
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses as inf
        raise ApiError(400, f"'{name}' must be a finite number", param=name)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        raise ApiError(400, f"'{name}' must be {_range_text(minimum, maximum)} (got {value})", param=name)
    return value


def _range_text(minimum: float | None, maximum: float | None) -> str:
    """'between 0 and 2', 'at least 1' or 'at most 4', whichever bounds exist."""
    def text(bound: float | None) -> str:
        return f"{bound:g}" if isinstance(bound, float) else str(bound)

    if minimum is not None and maximum is not None:
        return f"between {text(minimum)} and {text(maximum)}"
    return f"at least {text(minimum)}" if minimum is not None else f"at most {text(maximum)}"


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    seq = types if isinstance(types, tuple) else (types,)
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in seq))


def stop_strings(data: dict[str, Any]) -> tuple[str, ...]:
    """``data["stop"]``: a string or up to ``MAX_STOP_SEQUENCES`` of them (empty ones dropped)."""
    stop = data.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"'stop' must be a string or up to {MAX_STOP_SEQUENCES} strings", param="stop")
    return tuple(s for s in stop if s)


# -- ids and framing ----------------------------------------------------------------------------

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, length: int = 24) -> str:
    """``prefix`` and ``length`` random letters and digits: ``chatcmpl-...``, ``call_...``."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
