"""The child process that holds a model split across RPC workers (``remote.RemoteModel`` starts it).

ggml aborts the process that holds a model when one of its workers goes away, so that process is
this one and never a server. It loads the model (``LlamaCppModel``, whose settings name the
workers), then serves the parent over its stdin and stdout, one JSON object a line:

- first the parent sends ``{"path", "settings"}``; the child answers ``{"ready": {"info",
  "placement"}}`` (placement: llama.cpp's model buffer per device, in MiB) or ``{"failed": error}``;
- then requests with an ``id``: ``tokenize``, ``detokenize``, ``token_bytes`` and ``reset`` (answered with
  ``{"id", "result"}``), ``generate`` on a slot (answered by ``{"id", "event"}`` per token, the last
  with the slot's cached ``prefix``), ``cancel`` (no answer) and ``close``;
- an error is ``{"id", "error": {"class", "message", "hint"}}``; every few seconds while anything
  generates, ``{"progress": n}`` counts the tokens evaluated so far (a long prefill is not a hang).

Native libraries print to stdout; the protocol has its own copy of the descriptor, and stdout
itself is pointed at stderr before anything loads.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from dataclasses import asdict
from typing import IO, Any

from edge_runtime.backends.base import CancelToken, SamplingParams, Settings, TokenEvent
from edge_runtime.errors import EdgeRuntimeError

PROGRESS_EVERY_S = 5.0
_BUFFER_LINE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB")


def error_report(exc: BaseException) -> dict[str, Any]:
    """An exception as the protocol carries it (``trial_load``'s shape)."""
    if isinstance(exc, EdgeRuntimeError):
        return {"class": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    return {"class": "internal", "message": f"{type(exc).__name__}: {exc}", "hint": "EDGERT_DEBUG=1 shows more"}


def event_to_dict(event: TokenEvent) -> dict[str, Any]:
    return {"token": event.token, "text": event.text, "finish_reason": event.finish_reason,
            "stats": asdict(event.stats) if event.stats is not None else None}


class _Channel:
    """The protocol's own stdout: one locked JSON line per message."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self._out: IO[str] = os.fdopen(os.dup(1), "w", encoding="utf-8")
        os.dup2(2, 1)  # whatever else writes to stdout (llama.cpp, ggml) lands on stderr
        self._lock = threading.Lock()

    def send(self, message: dict[str, Any]) -> None:
        line = json.dumps(message) + "\n"
        with self._lock:
            self._out.write(line)
            self._out.flush()


class _Placement(logging.Handler):
    """Collects llama.cpp's "model buffer size" lines while the model loads: where the weights went."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.buffers: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        match = _BUFFER_LINE.search(record.getMessage())
        if match:
            self.buffers[match[1]] = self.buffers.get(match[1], 0.0) + float(match[2])


class _Host:
    """The loaded model and the generations running on it, one thread each."""

    def __init__(self, model: Any, channel: _Channel) -> None:
        self.model = model
        self.channel = channel
        self.slots = list(model.slots)
        self.cancels: dict[int, CancelToken] = {}
        self.stopped = threading.Event()
        threading.Thread(target=self._report_progress, name="edgert-progress", daemon=True).start()

    def handle(self, request: dict[str, Any]) -> None:
        op, rid = request.get("op"), request.get("id")
        try:
            if op == "generate":
                self.cancels[rid] = CancelToken()
                threading.Thread(target=self._generate, args=(request,), daemon=True,
                                 name=f"edgert-generate-{rid}").start()
            elif op == "cancel":
                cancel = self.cancels.get(rid)
                if cancel is not None:
                    cancel.cancel()
            elif op == "tokenize":
                result: Any = self.model.tokenize(request["text"], special=request["special"],
                                                  add_bos=request["add_bos"])
                self.channel.send({"id": rid, "result": result})
            elif op == "detokenize":
                self.channel.send({"id": rid, "result": self.model.detokenize(request["tokens"])})
            elif op == "token_bytes":  # a list of ints: JSON has no bytes
                self.channel.send({"id": rid, "result": list(self.model.token_bytes(request["token"]))})
            elif op == "reset":
                self._reset(request["slots"])
                self.channel.send({"id": rid, "result": None})
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as exc:
            self.channel.send({"id": rid, "error": error_report(exc)})

    def _generate(self, request: dict[str, Any]) -> None:
        rid = request["id"]
        slot = self.slots[request["slot"]]
        try:
            slot.wait_idle()  # a stream the parent abandoned may still be stopping
            raw = request["params"]
            params = SamplingParams(**{**raw, "stop": tuple(raw.get("stop") or ())})
            for event in slot.generate(request["tokens"], params, cancel=self.cancels[rid]):
                message: dict[str, Any] = {"id": rid, "event": event_to_dict(event)}
                if event.finish_reason is not None:
                    message["prefix"] = list(slot.prefix.tokens)
                self.channel.send(message)
        except Exception as exc:
            self.channel.send({"id": rid, "error": error_report(exc)})
        finally:
            self.cancels.pop(rid, None)

    def _reset(self, indices: list[int]) -> None:
        """Forget the caches of the slots the parent holds idle (``LlamaCppModel.reset``, per slot)."""
        scheduler = self.model.scheduler
        for index in indices:
            slot = self.slots[index]
            slot.wait_idle()
            if scheduler is not None:
                with scheduler.context_lock:
                    self.model.context.seq_clear(slot.seq.seq_id)
                    slot.prefix.tokens.clear()

    def _report_progress(self) -> None:
        last = -1
        while not self.stopped.wait(PROGRESS_EVERY_S):
            if self.cancels and self.model.evaluated_total != last:
                last = self.model.evaluated_total
                self.channel.send({"progress": last})

    def close(self) -> None:
        self.stopped.set()
        for cancel in list(self.cancels.values()):
            cancel.cancel()
        self.model.close()


def main() -> int:
    """Load the model the parent names, then answer its requests until it says close or goes away."""
    from edge_runtime.backends.llamacpp.model import LlamaCppModel

    channel = _Channel()
    placement = _Placement()
    llama_log = logging.getLogger("edge_runtime.llama_cpp")
    llama_log.setLevel(logging.DEBUG)
    llama_log.addHandler(placement)
    try:
        setup = json.loads(sys.stdin.readline() or "{}")
        model = LlamaCppModel(setup["path"], Settings.from_dict(setup["settings"]))
    except Exception as exc:
        channel.send({"failed": error_report(exc)})
        return 1
    finally:
        llama_log.removeHandler(placement)
        llama_log.setLevel(logging.NOTSET)
    channel.send({"ready": {"info": model.info.to_dict(), "placement": placement.buffers}})
    host = _Host(model, channel)
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request.get("op") == "close":
                break
            host.handle(request)
    finally:
        host.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
