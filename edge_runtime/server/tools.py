"""Tool calls: the tools in the prompt and the grammar that makes a call parse (``tool_calls`` reads them back).

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
from functools import lru_cache
from typing import Any

from edge_runtime.server.requests import Message, Tool, ToolUse

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


@lru_cache(maxsize=16)
def template_takes_tools(source: str) -> bool:
    """Whether a chat template reads a ``tools`` variable (parsed, never run)."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return "tools" in meta.find_undeclared_variables(Environment().parse(source))
    except TemplateSyntaxError:
        return False


def arguments_object(text: str) -> Any:
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
                                   "function": {"name": c.name, "arguments": arguments_object(c.arguments)}}
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
            calls = [{"name": c.name, "arguments": arguments_object(c.arguments)} for c in m.tool_calls]
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
