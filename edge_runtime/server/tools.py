"""Tool calls: the tools in the prompt, the grammar that makes a call parse, and the calls read back.

Two ways into the prompt. A chat template that uses a ``tools`` variable (Qwen, Hermes, Llama
3.x ...) renders the tools, the assistant's earlier calls and the tool results itself, in the
model's own words; its calls come back Hermes-style, one ``<tool_call>`` block per call holding
``{"name": ..., "arguments": {...}}``. Any other template (SmolLM2's, ChatML) gets the fallback:
a block at the end of the system prompt listing the tools and the one format to answer in,

    <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>

and the history rewritten into that same format (an earlier call as that text in the assistant's
message, a tool result as a ``<tool_response>`` block in a user message). The reader takes both
forms back, whichever the model writes.

``tool_choice`` ``required`` or a named function is enforced: a Lark grammar whose calls are
``%json`` schemas built from each tool's parameters, so every call parses and its arguments
validate. ``auto`` leaves the model free (a small model is not pushed into calling, stop strings
still apply, nothing is masked) and reads a call if the answer is one; one that does not parse
stays text. With ``auto`` and a ``response_format`` schema, the grammar allows a call or the
structured answer. ``none`` renders no tools.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from edge_runtime.server.requests import Message, TextPiece, Tool, ToolCallPiece, ToolUse

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# How calls are written: json.dumps's separators, no other whitespace. Small models write it.
CALL_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
FALLBACK_INSTRUCTIONS = (
    "You can call these tools (each with the JSON Schema of its arguments):\n{tools}\n\n"
    "To call tools, answer with only this line, and nothing after it:\n"
    '<tool_call>[{{"name": "tool_name", "arguments": {{"argument": "value"}}}}]</tool_call>\n'
    "{rule}"
)
RULES = {
    "auto": "Call a tool when it helps; otherwise answer in plain text.",
    "required": "Answer with a tool call.",
}
_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


@lru_cache(maxsize=16)
def template_takes_tools(source: str) -> bool:
    """Whether a chat template reads a ``tools`` variable (parsed, never run)."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(source))
    except TemplateSyntaxError:
        return False


def _arguments_object(text: str) -> Any:
    """A call's arguments as the object templates expect; text that is no JSON stays text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def template_messages(messages: tuple[Message, ...]) -> list[dict[str, Any]]:
    """Messages as a chat template that takes tools reads them (calls' arguments as objects)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            item["tool_calls"] = [{"id": c.id, "type": "function",
                                   "function": {"name": c.name, "arguments": _arguments_object(c.arguments)}}
                                  for c in m.tool_calls]
        if m.role == "tool":
            item["tool_call_id"] = m.tool_call_id or ""
            if m.name:
                item["name"] = m.name
        out.append(item)
    return out


def fallback_messages(messages: tuple[Message, ...], use: ToolUse | None) -> list[dict[str, str]]:
    """Messages for a template that knows no tools: calls and results as text, the tools in the system prompt."""
    names = {c.id: c.name for m in messages for c in m.tool_calls}
    out: list[dict[str, str]] = []
    for m in messages:
        if m.role == "tool":
            result = {"name": m.name or names.get(m.tool_call_id or "", ""), "content": m.content}
            text = f"<tool_response>{json.dumps(result, ensure_ascii=False)}</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1]["content"] += "\n" + text  # results of one turn's calls: one message
            else:
                out.append({"role": "user", "content": text})
        elif m.tool_calls:
            calls = [{"name": c.name, "arguments": _arguments_object(c.arguments)} for c in m.tool_calls]
            written = OPEN + json.dumps(calls, ensure_ascii=False) + CLOSE
            out.append({"role": "assistant", "content": f"{m.content}\n{written}" if m.content else written})
        else:
            out.append({"role": m.role, "content": m.content})
    if use is None or not use.calls_possible:
        return out
    block = FALLBACK_INSTRUCTIONS.format(tools=_tools_text(use), rule=_rule(use))
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
    else:
        out.insert(0, {"role": "system", "content": block})
    return out


def _offered(use: ToolUse) -> list[Tool]:
    return [t for t in use.tools if use.choice != "function" or t.name == use.function]


def _tools_text(use: ToolUse) -> str:
    lines = []
    for tool in _offered(use):
        item = {"name": tool.name, "description": tool.description or "", "parameters": tool.parameters}
        lines.append(json.dumps(item, ensure_ascii=False))
    return "\n".join(lines)


def _rule(use: ToolUse) -> str:
    if use.choice == "function":
        return f"Answer with a call of {use.function}."
    rule = RULES[use.choice]
    return rule if use.parallel else rule + " Call one tool at a time."


# -- the grammar --------------------------------------------------------------------------------

def tool_grammar(use: ToolUse, native: bool, answer_schema: dict[str, Any] | None = None) -> str | None:
    """The Lark grammar (llguidance's dialect) an answer must follow; None where nothing is enforced.

    ``native``: calls in the Hermes form of templates that take tools; otherwise the fallback's.
    ``answer_schema``: under ``auto``, the schema the answer follows when it is no call.
    """
    if not use.calls_possible or (use.choice == "auto" and answer_schema is None):
        return None
    single = not use.parallel or use.choice == "function"
    call = _call_schema(_offered(use))
    if native:
        rules = [f"call: %json {json.dumps({**call, 'x-guidance': CALL_JSON_STYLE})}",
                 'block: "<tool_call>\\n" call "\\n</tool_call>"',
                 "calls: block" if single else 'calls: block ("\\n" block)*']
    else:
        array: dict[str, Any] = {"type": "array", "minItems": 1, "items": call, "x-guidance": CALL_JSON_STYLE}
        if single:
            array["maxItems"] = 1
        defs = array["items"].pop("$defs", None)
        if defs:
            array["$defs"] = defs
        rules = [f"calls_json: %json {json.dumps(array)}", 'calls: "<tool_call>" calls_json "</tool_call>"']
    if answer_schema is not None and use.choice == "auto":
        from edge_runtime.backends.constraints import JSON_WHITESPACE

        answer = answer_schema if "x-guidance" in answer_schema else {
            **answer_schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
        rules += [f"answer: %json {json.dumps(answer)}", "start: calls | answer"]
    else:
        rules.append("start: calls")
    return "%llguidance {}\n" + "\n".join(rules) + "\n"


def _call_schema(tools: list[Tool]) -> dict[str, Any]:
    """One call of any of ``tools``: ``{"name": <const>, "arguments": <its parameters>}``.

    Each tool's ``$defs`` move to the root under the tool's name (``$ref``s rewritten), since
    the call schema nests the parameters where ``#/$defs/...`` would point elsewhere.
    """
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        params = copy.deepcopy(tool.parameters)
        found = {}
        for key in ("$defs", "definitions"):
            for name, schema in (params.pop(key, None) or {}).items():
                found[f"#/{key}/{name}"] = (f"{tool.name}__{name}", schema)
        renames = {old: f"#/$defs/{new}" for old, (new, _) in found.items()}
        defs.update({new: _renamed_refs(schema, renames) for new, schema in found.values()})
        options.append({"type": "object",
                        "properties": {"name": {"const": tool.name}, "arguments": _renamed_refs(params, renames)},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "$defs": defs} if defs else schema


def _renamed_refs(node: Any, renames: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: (renames.get(v, v) if k == "$ref" and isinstance(v, str) else _renamed_refs(v, renames))
                for k, v in node.items()}
    if isinstance(node, list):
        return [_renamed_refs(v, renames) for v in node]
    return node


# -- reading calls back -------------------------------------------------------------------------

def _held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallReader:
    """Splits an answer into text and tool calls as it streams.

    ``incremental`` (for answers a grammar makes well formed): a call's id and name go out as
    soon as they are written, then its arguments as they come. Otherwise a ``<tool_call>`` block
    is held until it closes and then read whole: calls of known tools with object arguments, or,
    if it is anything else, the text it was. Whitespace at the ends of the text is not shown.
    """

    def __init__(self, use: ToolUse, make_id: Callable[[], str], *, incremental: bool) -> None:
        self._names = {t.name for t in use.tools}
        self._make_id = make_id
        self._incremental = incremental
        self._buffer = ""
        self._block: str | None = None  # the text of an open block
        self._string = (False, False)  # (inside a JSON string, after a backslash) at the block's end
        self._scanner: _CallScanner | None = None
        self._gap = ""  # whitespace not yet shown: it may end up between calls
        self.calls = 0
        self._shown = False

    def push(self, text: str) -> list[TextPiece | ToolCallPiece]:
        """The pieces ``text`` completes (parts of it may wait for what follows)."""
        out: list[TextPiece | ToolCallPiece] = []
        self._buffer += text
        while True:
            if self._block is None:
                at = self._buffer.find(OPEN)
                if at < 0:
                    keep = _held_prefix(self._buffer, OPEN)
                    out += self._text(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                out += self._text(self._buffer[:at])
                self._buffer = self._buffer[at + len(OPEN):]
                self._block, self._string = "", (False, False)
                self._scanner = _CallScanner(self.calls, self._make_id) if self._incremental else None
            else:
                end, closed = self._block_end()
                out += self._into_block(self._buffer[:end])
                if not closed:
                    self._buffer = self._buffer[end:]
                    return out
                self._buffer = self._buffer[end + len(CLOSE):]
                out += self._close_block()

    def _block_end(self) -> tuple[int, bool]:
        """Where the open block's text ends in the buffer, and whether a ``</tool_call>`` ends it there.

        The marker counts only outside JSON strings: an argument may spell it. A partial marker
        at the end of the buffer is held back until the next text says what it is.
        """
        buf = self._buffer
        in_string, escape = self._string
        for i, ch in enumerate(buf):
            if in_string:
                escape, in_string = (False, True) if escape else (ch == "\\", ch != '"')
            elif buf.startswith(CLOSE, i):
                return i, True
            elif CLOSE.startswith(buf[i:]):
                return i, False
            elif ch == '"':
                in_string = True
            self._string = (in_string, escape)
        return len(buf), False

    def finish(self) -> list[TextPiece | ToolCallPiece]:
        """What is left when the answer ends (a block a stop string or the length cut short)."""
        out: list[TextPiece | ToolCallPiece] = []
        if self._block is not None:
            out += self._into_block(self._buffer)
            out += self._close_block()
        else:
            out += self._text(self._buffer)
        self._buffer = ""
        return out

    def _text(self, text: str) -> list[TextPiece | ToolCallPiece]:
        # Whitespace waits until text follows it, so it never shows between calls or after them,
        # however the text was cut into pieces.
        text = self._gap + text
        body = text.rstrip()
        self._gap = text[len(body):]
        if not body:
            return []
        self._shown, shown = True, self._shown
        return [TextPiece(body if shown else body.lstrip())]

    def _into_block(self, text: str) -> list[TextPiece | ToolCallPiece]:
        assert self._block is not None
        self._block += text
        if self._scanner is None or not text:
            return []
        pieces = self._scanner.feed(text)
        self.calls = self._scanner.index
        self._shown = self._shown or bool(pieces)
        return list(pieces)

    def _close_block(self) -> list[TextPiece | ToolCallPiece]:
        block, self._block = self._block or "", None
        if self._scanner is not None:
            self._scanner = None
            return []
        calls = self._calls_in(block)
        if calls is None:
            return self._text(OPEN + block + CLOSE)
        out: list[TextPiece | ToolCallPiece] = []
        for name, arguments in calls:
            out += [ToolCallPiece(self.calls, "", id=self._make_id(), name=name),
                    ToolCallPiece(self.calls, json.dumps(arguments, ensure_ascii=False))]
            self.calls += 1
        self._gap = ""
        self._shown = True
        return out

    def _calls_in(self, block: str) -> list[tuple[str, dict[str, Any]]] | None:
        """The (name, arguments) of a block's calls, or None when it is not calls of known tools."""
        try:
            value = json.loads(block)
        except ValueError:
            return None
        items = value if isinstance(value, list) else [value]
        calls = []
        for item in items:
            if not isinstance(item, dict) or item.get("name") not in self._names:
                return None
            arguments = item.get("arguments", {})
            if isinstance(arguments, str):
                arguments = _arguments_object(arguments)
            if not isinstance(arguments, dict):
                return None
            calls.append((item["name"], arguments))
        return calls or None


class _CallScanner:
    """Follows the JSON of a block as it arrives: a call's id and name once written, then its arguments."""

    def __init__(self, index: int, make_id: Callable[[], str]) -> None:
        self.index = index
        self._make_id = make_id
        self._stack: list[str] = []
        self._in_string = self._escape = False
        self._level = 0  # stack depth inside the open call object; 0: no call open
        self._head = ""  # a call's text until its arguments begin
        self._named = self._awaiting = self._in_arguments = False

    def feed(self, text: str) -> list[ToolCallPiece]:
        out: list[ToolCallPiece] = []
        arguments: list[str] = []
        for ch in text:
            if self._awaiting and not ch.isspace():  # the arguments' text starts at its first bracket
                self._awaiting, self._in_arguments = False, True
            if self._in_arguments:
                arguments.append(ch)
            elif self._level and not self._named:
                self._head += ch
            closed = self._step(ch)
            if self._level and not self._named and _CALL_HEAD.fullmatch(self._head):
                name = json.loads(f'"{_CALL_HEAD.fullmatch(self._head).group(1)}"')  # type: ignore[union-attr]
                out.append(ToolCallPiece(self.index, "", id=self._make_id(), name=name))
                self._named = self._awaiting = True
            if closed == "call":
                if arguments:
                    out.append(ToolCallPiece(self.index, "".join(arguments)))
                    arguments = []
                self.index += 1
        if arguments:
            out.append(ToolCallPiece(self.index, "".join(arguments)))
        return out

    def _step(self, ch: str) -> str | None:
        """Track strings and nesting; "call" when ``ch`` closed a call object."""
        if self._in_string:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_string = False
            return None
        if ch == '"':
            self._in_string = True
        elif ch in "[{":
            self._stack.append(ch)
            if ch == "{" and not self._level and self._stack[:-1] in ([], ["["]):
                self._level, self._head = len(self._stack), "{"
        elif ch in "]}" and self._stack:
            self._stack.pop()
            if self._level and len(self._stack) == self._level and self._in_arguments:
                self._in_arguments = False
            elif self._level and len(self._stack) < self._level:
                self._level, self._head = 0, ""
                self._named = self._awaiting = self._in_arguments = False
                return "call"
        return None
