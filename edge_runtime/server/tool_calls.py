"""Tool calls read back from an answer as it streams, in either form ``tools`` prompts for."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from edge_runtime.server.requests import TextPiece, ToolCallPiece, ToolUse
from edge_runtime.server.tools import CLOSE, OPEN, arguments_object

_CALL_HEAD = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


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
                arguments = arguments_object(arguments)
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
