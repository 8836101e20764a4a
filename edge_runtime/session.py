"""A chat: history, the model's own chat template (sandboxed), and the context-window policy.

The KV cache is the model's business: a Session renders the whole conversation each turn and
``Model.generate`` evaluates only the tokens that differ from what it already holds.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_runtime.backends.base import CancelToken, GenerationStats, Model, SamplingParams, TokenEvent
from edge_runtime.errors import ContextLengthExceededError, InvalidConfigError, InvalidRequestError
from edge_runtime.files import atomic_write, parse_json, read_regular_file

# Used when a model carries no template of its own: ChatML, which most small instruct models use.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION_VERSION = 1
CONVERSATION_MAX_BYTES = 64 << 20  # far more than any context holds; /load of a device or a huge file stops here
ROLES = ("system", "user", "assistant")


class TemplateError(InvalidConfigError):
    """A chat template that fails to render (or tries to escape its sandbox)."""


def compile_template(source: str) -> Callable[..., str]:
    """Compile a chat template in an immutable sandbox: templates come with untrusted files."""
    from jinja2 import TemplateError as JinjaError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(f"the chat template refused the conversation: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        template = env.from_string(source)
    except JinjaError as exc:
        raise TemplateError(f"the chat template does not parse: {exc}") from exc

    def render(**variables: Any) -> str:
        try:
            return template.render(**variables)
        except TemplateError:
            raise
        except JinjaError as exc:  # includes SecurityError from the sandbox
            raise TemplateError(f"the chat template failed: {exc}") from exc

    return render


class ChatFormatter:
    """Renders messages with a model's own chat template (sandboxed) and tokenizes them.

    Markup comes from the template only: each message's text is tokenized as text, so a message
    that spells ``<|im_end|>`` cannot end its turn and open another. The template is rendered
    once with the messages and once with a placeholder for each message's text; the second shows
    which stretches of the prompt are the template's. The tokens are those the whole prompt
    would give (markup splits the prompt into runs of text, each tokenized alone, as tokenizers
    do), except that no markup is found inside a message.
    """

    def __init__(self, model: Model, template: str | None = None) -> None:
        self.model = model
        self._render = compile_template(template or model.info.chat_template or FALLBACK_TEMPLATE)
        self._markup: dict[int, str | None] = {}  # token id -> its text, when it is a control token
        self._runs: dict[str, list[str | int]] = {}  # template text -> its text runs and markup tokens

    def tokens(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Tokens of ``messages`` followed by the prompt for the assistant's reply.

        ``tools`` (OpenAI's tool definitions) reach the template's ``tools`` variable, for
        templates that render tools themselves.
        """
        info = self.model.info
        variables: dict[str, Any] = {"add_generation_prompt": True, "bos_token": info.bos_token or "",
                                     "eos_token": info.eos_token or ""}
        if tools is not None:
            variables["tools"] = tools
        text = self._render(messages=messages, **variables)
        add_bos = bool(info.add_bos and not (info.bos_token and text.startswith(info.bos_token)))
        parts = self._split(messages, text, variables)
        runs = self._runs_of(parts) if parts is not None else None
        if runs is None:
            # The template does something to a message's text that the split cannot follow (it
            # changes its case, cuts it, or drops a placeholder): tokenize the prompt whole, which
            # is safe while no message spells markup, and refuse one that does.
            if any(self._spells_markup(m["content"]) for m in messages if isinstance(m.get("content"), str)):
                raise InvalidRequestError(
                    "a message holds the text of a control token (such as <|im_end|>), and this model's "
                    "chat template rewrites messages in a way that cannot keep it apart from the markup",
                    "remove the control token's text from the message")
            return self.model.tokenize(text, special=True, add_bos=add_bos)
        tokens = self.model.tokenize("", add_bos=True) if add_bos else []
        for run in runs:
            if isinstance(run, int):
                tokens.append(run)
            else:
                tokens += self.model.tokenize(run, special=False)
        return tokens

    def _split(self, messages: list[dict[str, str]], text: str,
               variables: dict[str, Any]) -> list[tuple[str, bool]] | None:
        """``text`` cut into (piece, is a message's text), or None where the cut cannot be made."""
        if not all(isinstance(m.get("content"), str) for m in messages):
            return None
        tag = f"EDGERT{secrets.token_hex(8)}M"  # letters and digits: survives trim, escaping and joins
        marked = [{**m, "content": f"{tag}{i}E"} for i, m in enumerate(messages)]
        try:
            pieces = re.split(f"{tag}([0-9]+)E", self._render(messages=marked, **variables))
        except TemplateError:  # e.g. a template that checks what a message says
            return None
        parts: list[tuple[str, bool]] = []
        pos = 0
        for k, piece in enumerate(pieces):
            if k % 2 == 0:  # the template's own text
                if not text.startswith(piece, pos):
                    return None
                parts.append((piece, False))
                pos += len(piece)
                continue
            content, after = messages[int(piece)]["content"], pieces[k + 1]
            # Templates trim messages (Llama 3, Gemma): the form that fits between the template's
            # pieces is the one the prompt holds.
            for form in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                if text.startswith(form, pos) and text.startswith(after, pos + len(form)):
                    break
            else:
                return None
            parts.append((form, True))
            pos += len(form)
        return parts if pos == len(text) else None

    def _runs_of(self, parts: list[tuple[str, bool]]) -> list[str | int] | None:
        """Runs of text between markup tokens, and the markup tokens, in prompt order."""
        runs: list[str | int] = []
        text: list[str] = []
        for piece, is_message in parts:
            items = [piece] if is_message else self._template_runs(piece)
            if items is None:
                return None
            for item in items:
                if isinstance(item, int):
                    if text:
                        runs.append("".join(text))
                        text = []
                    runs.append(item)
                else:
                    text.append(item)
        if text:
            runs.append("".join(text))
        return runs

    def _template_runs(self, piece: str) -> list[str | int] | None:
        """A piece of the template's text as text runs and markup tokens (cached: pieces repeat)."""
        if piece in self._runs:
            return self._runs[piece]
        out: list[str | int] = []
        pos = 0
        for token in self.model.tokenize(piece, special=True):
            mark = self._markup_text(token)
            if mark is None:
                continue
            at = piece.find(mark, pos)
            if at < 0:
                return None
            if at > pos:
                out.append(piece[pos:at])
            out.append(token)
            pos = at + len(mark)
        if pos < len(piece):
            out.append(piece[pos:])
        if len(self._runs) < 4096:
            self._runs[piece] = out
        return out

    def _markup_text(self, token: int) -> str | None:
        """The text of ``token`` if it is markup: a token only parsing special tokens makes."""
        if token not in self._markup:
            text = self.model.detokenize([token])
            is_markup = (bool(text) and self.model.tokenize(text, special=True) == [token]
                         and self.model.tokenize(text, special=False) != [token])
            self._markup[token] = text if is_markup else None
        return self._markup[token]

    def _spells_markup(self, text: str) -> bool:
        return self.model.tokenize(text, special=True) != self.model.tokenize(text, special=False)


@dataclass(frozen=True)
class Turn:
    """What one answer produced."""

    text: str
    finish_reason: str
    stats: GenerationStats | None


class Session:
    """A conversation with one model."""

    def __init__(
        self,
        model: Model,
        *,
        system: str | None = None,
        params: SamplingParams | None = None,
        on_notice: Callable[[str], None] | None = None,
        template: str | None = None,
    ) -> None:
        """``template``: a chat template to use instead of the model's own."""
        self.model = model
        self.params = params or SamplingParams()
        self.messages: list[dict[str, str]] = []
        self.system = system
        self.last_turn: Turn | None = None
        self._format = ChatFormatter(model, template)
        self._on_notice = on_notice or (lambda _msg: None)
        self._told_about_dropping = False
        self._window_start = 0  # index in messages of the oldest turn still sent to the model

    # -- conversation state ----------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages.clear()
        self._window_start = 0
        self.last_turn = None

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def to_dict(self) -> dict[str, Any]:
        return {"version": CONVERSATION_VERSION, "system": self.system, "messages": list(self.messages)}

    def save(self, path: str | Path) -> Path:
        """Write the conversation as JSON (atomically)."""
        return atomic_write(path, json.dumps(self.to_dict(), ensure_ascii=False, indent=2) + "\n")

    def load(self, path: str | Path) -> None:
        """Replace the conversation with one saved by ``save``."""
        self.restore(*read_conversation(path))

    def restore(self, system: str | None, messages: list[dict[str, str]]) -> None:
        """Replace the conversation with ``messages`` (``read_conversation``'s); the next turn's
        prompt finds its KV state in the model's cache, in memory or on disk, as if never left."""
        self.system, self.messages = system, list(messages)
        self._window_start = 0

    # -- prompting -------------------------------------------------------------------------

    def prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Render ``messages`` with the template and tokenize, ready for a reply."""
        return self._format.tokens(messages)

    def _fit_to_context(self, user_text: str) -> list[int]:
        """Tokens of the conversation plus ``user_text``, dropping old turns until it fits."""
        n_ctx = self.model.info.n_ctx
        budget = min(self.params.max_tokens, n_ctx // 2)
        system = [{"role": "system", "content": self.system}] if self.system else []
        new = [{"role": "user", "content": user_text}]
        alone = self.prompt_tokens(system + new)
        if len(alone) + budget > n_ctx:
            raise ContextLengthExceededError(len(alone), n_ctx - budget,
                                             "shorten the message, lower --max-tokens or raise --ctx")
        start = self._window_start
        tokens = self.prompt_tokens(system + self.messages[start:] + new)
        if len(tokens) + budget <= n_ctx:
            return tokens
        # Drop whole turns, oldest first, to three quarters of the room: the prompt then changes at
        # its start only every few turns, so the turns in between reuse the cache again.
        room = (n_ctx - budget) * 3 // 4
        while start < len(self.messages) and len(tokens) > room:
            start = self._next_user_turn(start)
            tokens = self.prompt_tokens(system + self.messages[start:] + new)
        dropped = start - self._window_start
        self._window_start = start
        if not self._told_about_dropping:
            self._told_about_dropping = True
            self._on_notice(
                f"the conversation outgrew the context ({n_ctx} tokens): "
                f"dropped the {dropped} oldest messages; older turns will be dropped as needed"
            )
        return tokens

    def _next_user_turn(self, start: int) -> int:
        i = start + 1
        while i < len(self.messages) and self.messages[i]["role"] != "user":
            i += 1
        return i

    def send(self, text: str, *, cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Stream the answer to ``text``; the answer (partial if cancelled) joins the history."""
        tokens = self._fit_to_context(text)
        params = replace(self.params, max_tokens=min(self.params.max_tokens,
                                                     self.model.info.n_ctx - len(tokens)))
        stream = self.model.generate(tokens, params, cancel=cancel)
        return self._record(text, stream)

    def _record(self, user_text: str, stream: Iterator[TokenEvent]) -> Iterator[TokenEvent]:
        self.messages.append({"role": "user", "content": user_text})
        pieces: list[str] = []
        finish, stats = "stop", None
        try:
            for event in stream:
                pieces.append(event.text)
                if event.finish_reason:
                    finish, stats = event.finish_reason, event.stats
                yield event
        finally:
            # Also on an abandoned stream: what was shown is what the history holds.
            answer = "".join(pieces)
            self.messages.append({"role": "assistant", "content": answer})
            self.last_turn = Turn(answer, finish, stats)


def read_conversation(path: str | Path) -> tuple[str | None, list[dict[str, str]]]:
    """The (system prompt, messages) of a file ``Session.save`` wrote; anything else is one error line."""
    shown = str(path)
    data = parse_json(read_regular_file(path, CONVERSATION_MAX_BYTES, "conversation file"), shown,
                      "give a file saved with /save")
    return parse_conversation(data, shown)


def parse_conversation(data: Any, source: str) -> tuple[str | None, list[dict[str, str]]]:
    """Validate a saved conversation; return (system prompt, messages)."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InvalidConfigError(f"{source}: expected an object with a 'messages' list")
    if data.get("version", CONVERSATION_VERSION) != CONVERSATION_VERSION:
        raise InvalidConfigError(f"{source}: not a conversation version this edgert reads ({CONVERSATION_VERSION})")
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise InvalidConfigError(f"{source}: 'system' must be a string")
    messages = []
    for i, m in enumerate(data["messages"]):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise InvalidConfigError(
                f"{source}: message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}"
            )
        messages.append({"role": m["role"], "content": m["content"]})
    return system, messages
