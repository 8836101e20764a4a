"""What a server holds while it runs: its configuration, the model once loaded, the requests in flight."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge_runtime.backends.base import Embedder, Model
from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.server.access import answered_hosts
from edge_runtime.server.admission import MemoryAdmission
from edge_runtime.server.metrics import ServerMetrics
from edge_runtime.server.wire import ApiError
from edge_runtime.session import ChatFormatter

if TYPE_CHECKING:
    from edge_runtime.server.response_replay import CachedResponses

log = logging.getLogger("edgert.server")


@dataclass(frozen=True)
class ServerConfig:
    """What ``edgert serve`` was asked for."""

    model_id: str
    parallel: int = 4
    queue_size: int = 64
    queue_timeout_s: float = 120.0
    api_key: str | None = None
    allow_origins: tuple[str, ...] = ()
    # Host names answered (see ``access``); None answers any. The default is loopback's.
    allowed_hosts: frozenset[str] | None = field(default_factory=lambda: answered_hosts("127.0.0.1"))
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 2
    # The RSS this process may reach (what it had before loading plus the plan's budget); None: no check.
    memory_limit_bytes: int | None = None
    embedding_model_id: str | None = None  # the id /v1/embeddings answers for (--embedding-model); None: none
    header_timeout_s: float = 10.0  # to send a whole request head (``listen``)
    body_timeout_s: float = 30.0  # to send a whole request body, once its head is in
    # Exact repeats of greedy requests answered from disk (--response-cache); None: off.
    response_cache: CachedResponses | None = None


class ServerState:
    """The model (once loaded) and the count of requests in flight."""

    def __init__(self, config: ServerConfig, load_model: Callable[[], Model]) -> None:
        self.config = config
        self._load_model = load_model
        self.model: Model | None = None
        self.embedder: Embedder | None = None  # loaded with the model when the config names one
        self.formatter: ChatFormatter | None = None
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.memory = MemoryAdmission(config.memory_limit_bytes, config.retry_after_s)
        self._lock = threading.Lock()
        self.in_flight = 0  # running + waiting for a slot
        self.running = 0

    def load(self) -> None:
        """Load the model; a failure goes to the log (clients see only "failed": it names paths)."""
        try:
            model = self._load_model()
            self.formatter = ChatFormatter(model)
            self.model = model
        except EdgeRuntimeError as exc:
            self.load_error = exc.message + (f" ({exc.hint})" if exc.hint else "")
        except Exception as exc:  # keep serving /health ("failed") instead of dying
            self.load_error = f"{type(exc).__name__}: {exc}"
        if self.load_error:
            log.error("the model failed to load: %s", self.load_error)

    def admit(self) -> None:
        with self._lock:
            if self.in_flight >= self.config.parallel + self.config.queue_size:
                raise ApiError(429, f"the server is busy: {self.in_flight} requests in flight",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(self.config.retry_after_s)})
            self.in_flight += 1
            self.metrics.queue_depth.set(self.in_flight - self.running)

    def started(self) -> None:
        with self._lock:
            self.running += 1
            self.metrics.slots_busy.set(self.running)
            self.metrics.queue_depth.set(self.in_flight - self.running)

    def done(self, was_running: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.running -= int(was_running)
            self.metrics.slots_busy.set(self.running)
            self.metrics.queue_depth.set(self.in_flight - self.running)
