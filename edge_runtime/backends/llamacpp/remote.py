"""A model split across RPC workers, held by a child process: the ``Model`` the rest of edgert sees.

``LlamaCppBackend.load`` returns a ``RemoteModel`` when the settings name workers. Its child
(``remote_host``) owns llama.cpp, the model and the connections to the workers, because ggml
aborts the process that holds them when a worker goes away. Here the same protocol as a local
model: ``generate`` streams ``TokenEvent``s, slots are handed out by the same ``SlotPool``,
``cancel``, ``reset`` and ``close`` reach the child. When the child dies (a worker stopped, or no
progress for ``STALL_S`` seconds, after which it is killed), every request it owed gets a
``WorkerUnavailableError`` (503 from the server) and the next request starts a fresh child, after
checking that every worker answers.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_runtime import errors
from edge_runtime.backends.base import (
    CancelToken,
    EvaluatedPrefix,
    GenerationStats,
    ModelInfo,
    SamplingParams,
    Settings,
    TokenEvent,
    check_prompt,
    default_threads,
)
from edge_runtime.backends.llamacpp import rpc
from edge_runtime.backends.slots import SlotPool, StreamGuard
from edge_runtime.errors import EdgeRuntimeError, GenerationError, WorkerUnavailableError

log = logging.getLogger(__name__)
LOAD_TIMEOUT_S = 900.0  # the weights travel to the workers: minutes for a large model on Wi-Fi
CALL_TIMEOUT_S = 60.0  # tokenize, detokenize, token_bytes, reset
STALL_S = 60.0  # a generation with no token and no evaluated token for this long is hung
_POLL_S = 0.1  # how often a waiting stream looks at its cancel token and the stall clock
_WORKER_HINT = ("check the workers (`edgert worker` on each); the next request starts the model again "
                "once they all answer")


def _error(report: dict[str, Any]) -> EdgeRuntimeError:
    """The child's error as the same class here (a ``GenerationError`` when the class is not ours)."""
    cls = getattr(errors, str(report.get("class")), None)
    message, hint = str(report.get("message")), report.get("hint")
    if not (isinstance(cls, type) and issubclass(cls, EdgeRuntimeError) and cls.__init__ is EdgeRuntimeError.__init__):
        cls = GenerationError
    return cls(message, hint if isinstance(hint, str) else None)


class _HostProcess:
    """One child holding the model: requests out, replies routed by id, and why it ended."""

    def __init__(self, path: str, settings: Settings) -> None:
        # The child must import this very edge_runtime, however this process found it.
        package_root = str(Path(__file__).resolve().parents[3])
        env = {**os.environ, **rpc.ABORT_ENV,
               "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
        self.process = subprocess.Popen([sys.executable, "-m", "edge_runtime.backends.llamacpp.remote_host"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=env, text=True, encoding="utf-8")
        self.endpoints = settings.rpc_servers
        self.failure: WorkerUnavailableError | None = None
        self.progress_at = time.monotonic()  # the last sign that generation moves on
        self._stderr: collections.deque[str] = collections.deque(maxlen=40)
        self._replies: dict[int, queue.SimpleQueue] = {0: queue.SimpleQueue()}  # 0: the ready message
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._progress = -1
        for target, name in ((self._read_stderr, "edgert-host-stderr"), (self._read, "edgert-host-reader")):
            threading.Thread(target=target, name=name, daemon=True).start()
        self.send({"path": path, "settings": settings.to_dict()})
        try:
            ready = self._replies[0].get(timeout=LOAD_TIMEOUT_S)
        except queue.Empty:
            self.kill()
            raise WorkerUnavailableError(f"loading the model on the workers did not finish within "
                                         f"{LOAD_TIMEOUT_S:.0f} s", _WORKER_HINT) from None
        if isinstance(ready, BaseException):
            raise ready
        if "failed" in ready:
            self.kill()
            raise _error(ready["failed"])
        self.info = ModelInfo(**ready["ready"]["info"])
        self.placement: dict[str, float] = ready["ready"]["placement"]

    @property
    def alive(self) -> bool:
        return self.failure is None and self.process.poll() is None

    def send(self, message: dict[str, Any]) -> None:
        """Write one request; a child gone already answers with its failure instead."""
        line = json.dumps(message) + "\n"
        try:
            with self._lock:
                assert self.process.stdin is not None
                self.process.stdin.write(line)
                self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the reader sees the end of stdout and fails every waiting request

    def request(self, op: str, **fields: Any) -> tuple[int, queue.SimpleQueue]:
        """Send a request; its replies arrive on the returned queue (a failure as an exception)."""
        rid = next(self._ids)
        replies: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            self._replies[rid] = replies
            failure = self.failure
        if failure is not None:
            replies.put(failure)
        else:
            self.send({"op": op, "id": rid, **fields})
        return rid, replies

    def forget(self, rid: int) -> None:
        with self._lock:
            self._replies.pop(rid, None)

    def call(self, op: str, **fields: Any) -> Any:
        """A request with one answer."""
        rid, replies = self.request(op, **fields)
        try:
            reply = replies.get(timeout=CALL_TIMEOUT_S)
        except queue.Empty:
            self.kill(f"it did not answer a {op} request within {CALL_TIMEOUT_S:.0f} s")
            reply = replies.get()
        finally:
            self.forget(rid)
        if isinstance(reply, BaseException):
            raise reply
        if "error" in reply:
            raise _error(reply["error"])
        return reply["result"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "progress" in message:
                if message["progress"] != self._progress:
                    self._progress, self.progress_at = message["progress"], time.monotonic()
                continue
            if "ready" in message or "failed" in message:
                self._replies[0].put(message)
                continue
            self.progress_at = time.monotonic()
            with self._lock:
                replies = self._replies.get(message.get("id"))
            if replies is not None:
                replies.put(message)
        self._ended(None)

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._stderr.append(line.rstrip())
            log.debug("model host: %s", line.rstrip())

    def _ended(self, why: str | None) -> None:
        """The child is gone: say why to every request still waiting, once."""
        code = self.process.wait()
        time.sleep(0.05)  # the stderr reader catches the last lines
        with self._lock:
            if self.failure is None:
                self.failure = WorkerUnavailableError(why or self._why(code), _WORKER_HINT)
            waiting = list(self._replies.values())
        for replies in waiting:
            replies.put(self.failure)

    def _why(self, code: int) -> str:
        workers = ", ".join(self.endpoints)
        said = rpc.abort_reason("\n".join(self._stderr))
        if said:
            return f"a worker ({workers}) went away: llama.cpp said '{said}'"
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        last = next((line for line in reversed(self._stderr) if line.strip()), "no output")
        return f"the process holding the model on the workers ({workers}) stopped ({how}: {last[:200]})"

    def kill(self, why: str | None = None) -> None:
        """Stop the child; waiting requests get ``why`` (or what its exit says)."""
        if why is not None:
            with self._lock:
                if self.failure is None:
                    self.failure = WorkerUnavailableError(f"the model's workers ({', '.join(self.endpoints)}) "
                                                          f"stopped answering: {why}", _WORKER_HINT)
        if self.process.poll() is None:
            self.process.kill()

    def close(self) -> None:
        """Ask the child to free the model and leave; kill it if it does not."""
        if self.process.poll() is None:
            self.send({"op": "close"})
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class RemoteSlot:
    """One sequence of the child's model; its ``prefix`` mirrors what the child's cache holds."""

    def __init__(self, model: RemoteModel, index: int) -> None:
        self._model = model
        self.index = index
        self.prefix = EvaluatedPrefix()
        self._guard = StreamGuard()

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Exactly ``Model.generate``, on this slot; a worker that does not answer raises here."""
        tokens = check_prompt(tokens, self._model.info)
        host = self._model.live_host()
        cancel = cancel or CancelToken()
        return self._guard.start(self._stream(host, tokens, params, cancel), cancel)

    def _stream(self, host: _HostProcess, tokens: list[int], params: SamplingParams,
                cancel: CancelToken) -> Iterator[TokenEvent]:
        rid, replies = host.request("generate", slot=self.index, tokens=tokens,
                                    params={**asdict(params), "stop": list(params.stop)})
        host.progress_at = time.monotonic()
        finished = cancel_sent = False
        try:
            while True:
                if cancel.cancelled and not cancel_sent:
                    host.send({"op": "cancel", "id": rid})
                    cancel_sent = True
                try:
                    message = replies.get(timeout=_POLL_S)
                except queue.Empty:
                    if time.monotonic() - host.progress_at > STALL_S:
                        host.kill(f"no token for {STALL_S:.0f} s")
                    continue
                if isinstance(message, BaseException):
                    raise message
                if "error" in message:
                    raise _error(message["error"])
                raw = message["event"]
                stats = GenerationStats(**raw["stats"]) if raw["stats"] is not None else None
                event = TokenEvent(raw["token"], raw["text"], raw["finish_reason"], stats)
                if event.finish_reason is not None:
                    self.prefix.tokens[:] = message["prefix"]
                    finished = True
                    yield event
                    return
                yield event
        finally:
            host.forget(rid)
            if not finished:
                self.prefix.tokens.clear()  # what the child's cache holds now is unknown here
                if host.alive:
                    host.send({"op": "cancel", "id": rid})

    def wait_idle(self) -> None:
        """Stop what the slot still streams, and return once it has stopped."""
        self._guard.wait_idle()


class RemoteModel:
    """A GGUF model whose layers sit on RPC workers, loaded and run by a child process."""

    def __init__(self, path: str, settings: Settings) -> None:
        rpc.require_library()
        for endpoint in settings.rpc_servers:
            rpc.check_reachable(endpoint)
        self.path = str(path)
        self.settings = settings
        self.n_threads = settings.n_threads or default_threads()
        self._lock = threading.Lock()
        self._closed = False
        self._host: _HostProcess | None = _HostProcess(self.path, settings)
        self.info: ModelInfo = self._host.info
        self.placement = dict(self._host.placement)  # MiB of weights per llama.cpp buffer (RPC0[host:port], ...)
        self.restarts = 0
        self.slots = SlotPool([RemoteSlot(self, i) for i in range(max(1, settings.n_parallel))])

    def live_host(self) -> _HostProcess:
        """The child, started again (after checking every worker answers) if the last one died."""
        with self._lock:
            if self._closed:
                raise GenerationError("the model is closed")
            if self._host is not None and self._host.alive:
                return self._host
            for slot in self.slots:
                slot.prefix.tokens.clear()  # a new child starts with empty caches
            self._host = None
            for endpoint in self.settings.rpc_servers:
                rpc.check_reachable(endpoint)
            log.info("starting the model on %s again", ", ".join(self.settings.rpc_servers))
            self._host = _HostProcess(self.path, self.settings)
            self.placement = dict(self._host.placement)
            self.restarts += 1
            return self._host

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        return self.live_host().call("tokenize", text=text, special=special, add_bos=add_bos)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.live_host().call("detokenize", tokens=list(tokens))

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.live_host().call("token_bytes", token=int(token)))

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens`` on a free slot (``LlamaCppModel.generate``'s contract)."""
        return self.slots.generate(check_prompt(tokens, self.info), params, cancel)

    def acquire_slot(self, prompt: Sequence[int] | None = None,
                     timeout: float | None = None) -> AbstractContextManager[RemoteSlot]:
        return self.slots.acquire(prompt, timeout)

    def reset(self) -> None:
        """Forget the cache of every idle slot."""
        with self.slots.idle() as idle:
            host = self._host
            if host is not None and host.alive:
                host.call("reset", slots=[slot.index for slot in idle])
            for slot in idle:
                slot.prefix.tokens.clear()

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, Any]]:
        """Not offered: quality scoring runs on a model loaded on one machine."""
        raise GenerationError("quality scoring does not run on a model split across workers",
                              "score the artifact without --workers")

    def close(self) -> None:
        """Stop the child (it frees the model and the workers' buffers); safe to call twice."""
        self.slots.close()
        with self._lock:
            self._closed = True
            host, self._host = self._host, None
        if host is not None:
            host.close()

    def __enter__(self) -> RemoteModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
