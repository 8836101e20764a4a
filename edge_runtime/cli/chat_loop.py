"""The interactive chat loop: streaming answers, slash commands, Ctrl-C stops an answer.

When stdin is not a terminal, each input line is one user message and only the answers are
written to stdout, so the loop can be scripted.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import TextIO

from edge_runtime.backends.base import CancelToken, GenerationStats
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.session import Session

HELP = """\
/reset          forget the conversation (keeps the system prompt)
/system TEXT    set the system prompt (empty TEXT removes it)
/stats          timings of the last answer
/save FILE      save the conversation as JSON
/load FILE      load a conversation saved with /save
/help           this list
/exit           leave (Ctrl-D too); Ctrl-C stops an answer"""


def stats_line(stats: GenerationStats) -> str:
    """The ``--stats`` line: space-separated key=value with bare numbers."""
    return (
        f"ttft_ms={stats.ttft_s * 1000:.1f} prompt_tokens={stats.prompt_tokens} "
        f"gen_tokens={stats.gen_tokens} prefill_tok_s={stats.prefill_tok_s:.1f} "
        f"decode_tok_s={stats.decode_tok_s:.1f}"
    )


def stats_summary(stats: GenerationStats) -> str:
    """The human ``/stats`` line."""
    return (
        f"ttft {stats.ttft_s * 1000:.0f} ms · prompt {stats.prompt_tokens} tok "
        f"({stats.cached_tokens} cached) · {stats.gen_tokens} tok generated · "
        f"{stats.decode_tok_s:.0f} tok/s"
    )


class ChatLoop:
    """Reads messages, streams answers, runs slash commands."""

    def __init__(
        self,
        session: Session,
        *,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        interactive: bool = True,
        show_stats: bool = False,
        read_line: Callable[[str], str] = input,
    ) -> None:
        self.session = session
        self.out, self.err = out, err
        self.interactive = interactive
        self.show_stats = show_stats
        self._read_line = read_line

    def run(self) -> None:
        """Loop until /exit or end of input."""
        while True:
            try:
                line = self._read_line("> " if self.interactive else "")
            except EOFError:
                if self.interactive:
                    self.err.write("\n")
                return
            except KeyboardInterrupt:
                self.err.write("\n(use Ctrl-D or /exit to leave)\n")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.answer(line)
            except EdgeRuntimeError as exc:
                self.err.write(f"error: {exc.message}\n")
                if exc.hint:
                    self.err.write(f"hint: {exc.hint}\n")

    def answer(self, text: str) -> None:
        """Stream the answer to one message; Ctrl-C stops it and keeps what was said."""
        cancel = CancelToken()
        previous = signal.getsignal(signal.SIGINT)
        in_main_thread = _in_main_thread()
        if in_main_thread:
            signal.signal(signal.SIGINT, lambda *_: cancel.cancel())
        try:
            for event in self.session.send(text, cancel=cancel):
                if event.text:
                    self.out.write(event.text)
                    self.out.flush()
        finally:
            if in_main_thread:
                signal.signal(signal.SIGINT, previous)
        self.out.write("\n")
        self.out.flush()
        turn = self.session.last_turn
        if turn is not None and turn.finish_reason == "cancelled":
            self.err.write("(stopped)\n")
        if self.show_stats and turn is not None and turn.stats is not None:
            self.err.write(stats_line(turn.stats) + "\n")
        self.err.flush()

    def command(self, line: str) -> bool:
        """Run one slash command; False means leave the loop."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.err.write(HELP + "\n")
        elif name == "/reset":
            self.session.reset()
            self.err.write("conversation cleared\n")
        elif name == "/system":
            self.session.set_system(arg)
            self.err.write("system prompt set\n" if arg else "system prompt removed\n")
        elif name == "/stats":
            turn = self.session.last_turn
            self.err.write((stats_summary(turn.stats) if turn and turn.stats else "no answer yet") + "\n")
        elif name in ("/save", "/load"):
            if not arg:
                self.err.write(f"usage: {name} FILE\n")
            else:
                try:
                    if name == "/save":
                        self.err.write(f"saved to {self.session.save(arg)}\n")
                    else:
                        self.session.load(arg)
                        self.err.write(f"loaded {len(self.session.messages)} messages from {arg}\n")
                except EdgeRuntimeError as exc:
                    self.err.write(f"error: {exc.message}\n")
                except OSError as exc:
                    self.err.write(f"error: {arg}: {exc.strerror}\n")
        else:
            self.err.write(f"unknown command {name}; /help lists them\n")
        self.err.flush()
        return True


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
