"""Converter steps that run in a child process, and the JSON-lines protocol they report on.

A step goes to a child when a native call cannot be interrupted (llama.cpp's quantizer ignores
Ctrl-C) or may abort the whole process, or when a library prints freely (litert-torch): the
parent can kill the child at once, a crash ends only the child, and the user sees our messages.
The child writes one JSON object per line on its original stdout; anything native code prints
there goes to stderr instead, whose tail the parent quotes when the child fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import IO, Any


def follow_worker(module: str, request: dict[str, Any],
                  on_message: Callable[[dict[str, Any]], None]) -> tuple[int, str]:
    """Run ``python -m module '<request as JSON>'``, hand each protocol line to ``on_message``.

    Returns the child's exit status and the last 2000 characters of its stderr. Any exception
    here, Ctrl-C included, kills the child before it propagates.
    """
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as stderr:
        cmd = [sys.executable, "-m", module, json.dumps(request)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, encoding="utf-8")
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    on_message(message)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        stderr.seek(0)
        return proc.returncode, stderr.read()[-2000:].strip()


def open_protocol() -> IO[str]:
    """In the child: the protocol stream (the original stdout), with stdout itself sent to stderr.

    Ctrl-C is ignored: the parent owns it, kills the child and removes any partial output.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    return protocol


def send(protocol: IO[str], **message: Any) -> None:
    protocol.write(json.dumps(message) + "\n")
    protocol.flush()
