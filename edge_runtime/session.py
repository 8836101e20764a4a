"""A chat: history, the model's own chat template (sandboxed), and the context-window policy.

The KV cache is the model's business: a Session renders the whole conversation each turn and
``Model.generate`` evaluates only the tokens that differ from what it already holds.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from edge_runtime.backends.base import CancelToken, GenerationStats, Model, SamplingParams, TokenEvent
from edge_runtime.errors import ContextLengthExceededError, InvalidConfigError
from edge_runtime.files import atomic_write

# Used when a model carries no template of its own: ChatML, which most small instruct models use.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION_VERSION = 1
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
    """Renders messages with a model's own chat template (sandboxed) and tokenizes them."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self._render = compile_template(model.info.chat_template or FALLBACK_TEMPLATE)

    def tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens of ``messages`` followed by the prompt for the assistant's reply."""
        info = self.model.info
        text = self._render(messages=messages, add_generation_prompt=True,
                            bos_token=info.bos_token or "", eos_token=info.eos_token or "")
        add_bos = info.add_bos and not (info.bos_token and text.startswith(info.bos_token))
        return self.model.tokenize(text, special=True, add_bos=add_bos)


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
    ) -> None:
        self.model = model
        self.params = params or SamplingParams()
        self.messages: list[dict[str, str]] = []
        self.system = system
        self.last_turn: Turn | None = None
        self._format = ChatFormatter(model)
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
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidConfigError(f"{path}: not a conversation file ({exc})") from None
        self.system, self.messages = parse_conversation(data, str(path))
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


def parse_conversation(data: Any, source: str) -> tuple[str | None, list[dict[str, str]]]:
    """Validate a saved conversation; return (system prompt, messages)."""
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise InvalidConfigError(f"{source}: expected an object with a 'messages' list")
    if data.get("version", CONVERSATION_VERSION) != CONVERSATION_VERSION:
        raise InvalidConfigError(f"{source}: conversation version {data.get('version')!r} is not supported")
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
