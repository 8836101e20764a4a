"""Prometheus metrics of one server, in a registry of its own (no process-wide globals)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from edge_runtime.backends.base import GenerationStats


class ServerMetrics:
    """Requests, tokens, time to first token, decode speed, queue depth and busy slots."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgert_requests", "Requests by endpoint and HTTP status (refused ones too)",
                                ["endpoint", "status"], registry=r)
        self.header_timeouts = Counter("edgert_header_timeouts",
                                       "Connections closed for not sending a whole request head in time",
                                       registry=r)
        self.prompt_tokens = Counter("edgert_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("edgert_cached_prompt_tokens",
                                     "Prompt tokens served from the KV cache (prefix reuse)", registry=r)
        self.generated_tokens = Counter("edgert_generated_tokens", "Tokens generated", registry=r)
        self.finished = Counter("edgert_generations_finished", "Generations by finish reason", ["reason"],
                                registry=r)
        self.ttft = Histogram("edgert_time_to_first_token_seconds", "Request start to first token",
                              buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.decode_speed = Histogram("edgert_decode_tokens_per_second", "Decode speed per request",
                                      buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500), registry=r)
        self.queue_depth = Gauge("edgert_queue_depth", "Requests waiting for a slot", registry=r)
        self.slots_busy = Gauge("edgert_slots_busy", "Slots generating now", registry=r)
        # Deterministic requests only, and only when the server runs with --response-cache.
        self.response_cache_hits = Counter("edgert_response_cache_hits",
                                           "Answers replayed from the response cache", registry=r)
        self.response_cache_misses = Counter("edgert_response_cache_misses",
                                             "Cacheable requests the response cache did not hold", registry=r)

    def observe(self, stats: GenerationStats | None, finish_reason: str) -> None:
        """Record one finished generation."""
        self.finished.labels(finish_reason).inc()
        if stats is None:
            return
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.gen_tokens)
        if stats.gen_tokens:
            self.ttft.observe(stats.ttft_s)
        if stats.decode_tok_s:
            self.decode_speed.observe(stats.decode_tok_s)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# The label of each route in ``edgert_requests``; any other path counts as "other", so a client
# that makes up paths cannot make up label values.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models",
             "/health": "health", "/metrics": "metrics"}


class RequestCounter:
    """ASGI middleware counting every request by endpoint and the status it was answered with.

    It sits outside every other check, so 401, 403 and 404 answers count as well; a request the
    application failed on before answering counts as the 500 Starlette then sends.
    """

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def noting_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            self.metrics.requests.labels(ENDPOINTS.get(scope["path"], "other"), str(status)).inc()
