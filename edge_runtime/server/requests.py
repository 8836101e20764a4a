"""The wire-neutral request every wire format translates into, and the events its answer is made of.

An OpenAI, Ollama or Anthropic route parses its own body into a ``GenerationRequest`` (messages
with the roles system, user, assistant and tool; the prompt of a plain completion; the
``SamplingParams``, constraint and logprobs included; the tools and how they may be used), hands
it to ``runner.start``, and renders the ``AnswerEvent``s that come back in its own shape: text
pieces, tool-call pieces, and one ``Finished`` with the counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_runtime.backends.base import GenerationStats, SamplingParams

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required", "function")


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made: ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Message:
    """One message of a conversation; ``tool_calls`` on the assistant's, ``tool_call_id`` on a tool result."""

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None  # the tool a tool result answers, where the wire format says


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is the JSON Schema of its arguments (an object)."""

    name: str
    description: str | None
    parameters: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's shape, which chat templates that take tools expect."""
        function: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolUse:
    """The tools of a request and how they may be used.

    ``choice``: ``none`` (the tools are described, never called), ``auto`` (the model decides),
    ``required`` (at least one call), ``function`` (a call of ``function``). ``parallel``: more
    than one call in an answer.
    """

    tools: tuple[Tool, ...]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def calls_possible(self) -> bool:
        return bool(self.tools) and self.choice != "none"


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate, whatever wire format asked: a chat (``messages``) or a completion (``prompt``).

    ``max_tokens`` None means as many as the context leaves; ``params.max_tokens`` is replaced
    with that once the prompt is measured.
    """

    kind: str  # "chat" or "text"
    model: str
    params: SamplingParams
    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    max_tokens: int | None = None
    tools: ToolUse | None = None
    stream: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and its most likely alternatives (``top``, each with
    no alternatives of its own).

    ``raw`` is the token's bytes (a piece of a UTF-8 character stays that piece: the client joins
    them), ``token`` their text (an incomplete character shows as U+FFFD).
    """

    token: str
    logprob: float
    raw: bytes
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TextPiece:
    """Answer text (never inside a tool call), with the logprobs of the tokens it came from."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallPiece:
    """Part of tool call ``index``: its first piece has ``id`` and ``name``, every piece some ``arguments``."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end: ``reason`` is ``stop``, ``length``, ``tool_calls`` or ``cancelled``."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: GenerationStats | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of tokens whose text nothing showed (an end token's)


AnswerEvent = TextPiece | ToolCallPiece | Finished


@dataclass
class Answer:
    """A whole answer, gathered from its events (what a non-streaming response shows)."""

    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None

    def add(self, event: AnswerEvent) -> None:
        """Fold one event in: text joins, a tool call's pieces join into one call."""
        self.logprobs += event.logprobs
        if isinstance(event, TextPiece):
            self.text += event.text
        elif isinstance(event, ToolCallPiece):
            if event.index == len(self.tool_calls):
                self.tool_calls.append(ToolCall(event.id or "", event.name or "", ""))
            call = self.tool_calls[event.index]
            self.tool_calls[event.index] = ToolCall(call.id, call.name, call.arguments + event.arguments)
        else:
            self.finished = event
