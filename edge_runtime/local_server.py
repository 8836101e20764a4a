"""A server process on this machine: a free loopback port, start it, wait until it answers, stop it.

The test suite, the benchmarks and the on-device suite (``edge_runtime.device_tests``) all run
``edgert serve`` (or another server) as a child process and need the same three steps; this is
the one copy. It lives in the package because the on-device suite is installed with it and the
benchmarks are scripts beside it, while ``tests/`` is importable from neither. Standard library
only (urllib, not httpx): the on-device suite runs where only the base install is.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence

LOOPBACK = "127.0.0.1"
# Loopback never goes through a proxy, whatever http_proxy says.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerNotReady(RuntimeError):
    """The server process exited, or did not answer in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the system picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 now."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):  # refused, reset, an error status, a half answer
        return False


def wait_until_serving(url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll ``url`` until it answers 200; raise ``ServerNotReady`` if ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while not answers(url):
        if process is not None and process.poll() is not None:
            raise ServerNotReady(f"the server exited with status {process.returncode} before {url} answered")
        if time.monotonic() > deadline:
            raise ServerNotReady(f"{url} did not answer within {timeout:g} s")
        time.sleep(0.25)


@contextlib.contextmanager
def running_server(argv: Sequence[str], ready_url: str, *, timeout: float = 180.0) -> Iterator[subprocess.Popen]:
    """Start ``argv``, wait until ``ready_url`` answers 200, and always stop the process afterwards.

    The process's output goes to a temporary file, not a pipe nobody reads (a full pipe would
    stall the server); a start that fails raises ``ServerNotReady`` ending with that output.
    """
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            try:
                wait_until_serving(ready_url, timeout, process)
            except ServerNotReady as exc:
                log.seek(0)
                tail = log.read()[-3000:].decode("utf-8", errors="replace")
                raise ServerNotReady(f"{exc}; its last output:\n{tail}") from None
            yield process
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
