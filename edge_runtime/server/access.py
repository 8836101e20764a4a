"""Who may use the server: the Host and Origin a request carries, and the API key.

A server on loopback is still reachable from every web page the user opens. Browsers send a
cross-site ``POST`` with ``Content-Type: text/plain`` without asking first, and with DNS
rebinding a page on ``evil.example.com`` can even read the answer (Ollama's CVE-2024-28224).
Two checks close that:

- **Host**: on a loopback bind only loopback names are answered (``localhost``, ``127.0.0.1``,
  ``[::1]``, the bound address itself, any port) plus the names given with ``--allow-host``;
  a rebound name arrives as ``Host: evil.example.com`` and gets a 403. On a non-loopback bind
  clients use whatever name or address reaches the machine, so there is no Host check unless
  ``--allow-host`` names the hosts to answer (then: those, loopback names and the bound address).
  A request without a Host header (HTTP/1.0) comes from no browser and passes.
- **Origin**: browsers always send it on cross-site requests; curl and the SDKs never do. A
  request whose Origin is not one of ``--allow-origin`` gets a 403, whatever its Content-Type.

With ``--api-key`` every route but ``/health`` (open for liveness probes) needs the key, in the
headers ``KEY_HEADERS`` names for the route. Plain ASGI, no Starlette import: the CLI imports
``is_loopback`` from here before it decides whether to load anything.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
OPEN_PATHS = ("/health",)
# Headers that may carry the key, by path prefix (first match wins); "authorization" means the
# Bearer scheme. Anthropic's SDK sends x-api-key (Claude Code sends a Bearer token).
KEY_HEADERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("/v1/messages", ("x-api-key", "authorization")),
    ("/", ("authorization",)),
)
# What a page on an --allow-origin may send: the key in either header, and the headers
# Anthropic's SDK adds (a browser asks in a preflight before it sends them).
CORS_HEADERS = ["Authorization", "Content-Type", "x-api-key", "anthropic-version", "anthropic-beta",
                "anthropic-dangerous-direct-browser-access"]
# The wire format whose error shape a refusal takes, by path prefix (first match wins).
ERROR_SHAPES: tuple[tuple[str, str], ...] = (("/v1/messages", "anthropic"), ("/api/", "ollama"), ("/", "openai"))


def is_loopback(host: str) -> bool:
    """True for names and addresses only this machine can reach."""
    if host.lower().rstrip(".") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def answered_hosts(bind: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names (without port, lower case) a server bound to ``bind`` answers; None: any."""
    extra = {_host_name(h) for h in extra if h}
    if not is_loopback(bind) and not extra:
        return None
    names = {*LOOPBACK_NAMES, "127.0.0.1", "::1", *extra}
    if bind not in ("0.0.0.0", "::", ""):
        names.add(_host_name(bind))
    return frozenset(names)


def _host_name(host: str) -> str:
    """``Host`` header value → the name alone: ``[::1]:8080`` → ``::1``, ``LocalHost.:80`` → ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def presented_key(scope: Scope, headers: tuple[str, ...]) -> bytes | None:
    """The key the request carries in the first of ``headers`` that holds one.

    ``authorization`` holds one only with the Bearer scheme, in any case (RFC 7235 §2.1).
    """
    found = {name.lower(): value for name, value in scope["headers"]}
    for header in headers:
        value = found.get(header.encode())
        if value is None:
            continue
        if header == "authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                continue
            value = token
        return value.strip()
    return None


def key_headers(path: str) -> tuple[str, ...]:
    """The headers that may carry the API key on ``path``."""
    return next(headers for prefix, headers in KEY_HEADERS if path.startswith(prefix))


class HostOriginGuard:
    """Answers 403 to a request whose Host or Origin this server does not serve (see the module)."""

    def __init__(self, app: App, hosts: frozenset[str] | None, origins: Iterable[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.origins = frozenset(origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {name.lower(): value for name, value in scope["headers"]}
            host = headers.get(b"host")
            if self.hosts is not None and host is not None:
                name = _host_name(host.decode("latin-1"))
                if name not in self.hosts:
                    await refuse(send, scope, 403, f"this server does not answer to the host name '{name}'",
                                 "host_not_allowed", "start the server with --allow-host NAME to allow it")
                    return
            origin = headers.get(b"origin")
            if origin is not None and "*" not in self.origins and origin.decode("latin-1") not in self.origins:
                shown = origin.decode("latin-1")
                await refuse(send, scope, 403, f"requests from the web origin '{shown}' are not allowed",
                             "origin_not_allowed", "start the server with --allow-origin ORIGIN to allow it")
                return
        await self.app(scope, receive, send)


class KeyGuard:
    """Every route but ``OPEN_PATHS`` needs the API key (compared in constant time)."""

    def __init__(self, app: App, api_key: str) -> None:
        self.app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            headers = key_headers(scope["path"])
            given = presented_key(scope, headers)
            if given is None or not hmac.compare_digest(given, self._expected):
                where = " or ".join("Authorization: Bearer KEY" if h == "authorization" else f"{h}: KEY"
                                    for h in headers)
                await refuse(send, scope, 401, f"a valid API key is needed: {where}", "invalid_api_key",
                             extra_headers=[(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)


async def refuse(send: Send, scope: Scope, status: int, message: str, code: str, hint: str | None = None, *,
                 extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Send an error before the application sees the request, in the shape of the route's wire format.

    The SDKs read their own shape: Anthropic's raises ``AuthenticationError`` from
    ``{"type": "error", "error": {"type": "authentication_error", ...}}``, Ollama's client shows
    ``{"error": "..."}``'s text, OpenAI's reads ``{"error": {"message", "type", "param", "code"}}``.
    """
    text = f"{message}; {hint}" if hint else message
    wire = next(shape for prefix, shape in ERROR_SHAPES if scope.get("path", "/").startswith(prefix))
    from edge_runtime.server.wire import ApiError  # the error path only: the CLI imports this module early

    error = ApiError(status, text, code=code)
    if wire == "anthropic":
        from edge_runtime.server.anthropic_wire import error_body

        doc = error_body(error)
    else:
        doc = {"error": error.message} if wire == "ollama" else error.body()
    body = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra_headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
