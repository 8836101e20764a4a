"""Memory admission: refuse a request (503) rather than let the process grow past its plan.

The plan sized the model to a budget (what was available less the profile's headroom); the server
holds the process to ``memory_limit_bytes``, its RSS before loading plus that budget. What grows
per request was measured before designing this (SmolLM2, llama.cpp, 4 slots of 1024, the server
in-process, psutil sampling every 5 ms): loading added 204 MiB, since llama.cpp clears the whole
KV cache of every slot at load, so those pages are resident from the start; the first four
concurrent chats added 21 MiB (buffers touched on each slot's first use, within the plan's
estimate), the next rounds 3, 0.4 and 0.2 MiB: flat. What a request does add is transient and
Python's: a 1 MB body peaked 36 MiB above idle while it was parsed, rendered and tokenized (about
40 bytes per body byte), and 100 kB peaked 4 MiB. The other backends, measured the same way on
the models the tests convert: an ONNX slot allocates its cache on first use (SmolLM2 int8, 2 slots
of 512: +69 MiB in the first round, within the plan's estimate, then +1.1, +1.3 ... +0.1 MiB a
round, settling); LiteRT holds its one exported cache from load (the tiny Llama: +4.7 MiB on
first use, then flat).

So admission is one comparison, made before the prompt is tokenized: the RSS now plus the
request's estimate (``request_bytes``) against the limit. Over it, the answer is a 503 with the
figures and a ``Retry-After``: what other requests hold is freed when they finish.
"""

from __future__ import annotations

from typing import Any

from edge_runtime.server.wire import ApiError

MIB = 1 << 20
# Per byte of body: the raw bytes, the parsed text, the rendered prompt, its tokens (measured
# about 40, see above); per token of prompt or answer: list entries, the slot's copy of the
# prompt, the answer's pieces and its streamed chunks.
BYTES_PER_BODY_BYTE = 48
BYTES_PER_TOKEN = 256


def request_bytes(body_bytes: int, n_tokens: int) -> int:
    """What one request adds to the process, at most, for a body and ``n_tokens`` of prompt and answer."""
    return body_bytes * BYTES_PER_BODY_BYTE + n_tokens * BYTES_PER_TOKEN


def process_rss() -> int:
    """The resident memory of this process now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


class MemoryAdmission:
    """Refuses requests that would take the process past ``limit_bytes`` (None: never)."""

    def __init__(self, limit_bytes: int | None, retry_after_s: int) -> None:
        self.limit_bytes = limit_bytes
        self.retry_after_s = retry_after_s
        self._process: Any = None  # psutil.Process, made on first use (psutil loads lazily)

    def check(self, extra_bytes: int) -> None:
        """Raise a 503 ``ApiError`` naming the figures if ``extra_bytes`` more would pass the limit."""
        if self.limit_bytes is None:
            return
        if self._process is None:
            import psutil

            self._process = psutil.Process()
        rss = int(self._process.memory_info().rss)
        if rss + extra_bytes > self.limit_bytes:
            raise ApiError(
                503, f"not enough memory for this request now: the server uses {rss / MIB:.0f} MiB, the request "
                     f"needs about {extra_bytes / MIB:.1f} MiB more, and the plan allows {self.limit_bytes / MIB:.0f} "
                     "MiB; retry later or send a shorter request",
                type="server_error", code="memory_exhausted", headers={"Retry-After": str(self.retry_after_s)})
