"""Child process for ``quantize.py``: runs llama.cpp's quantizer and reports its log.

Run as ``python -m edge_runtime.converters.quantize_worker '<json request>'``. One JSON object per
line goes to the original stdout: ``{"log": level, "text": line}`` for each llama.cpp log line,
then ``{"rc": code, "errors": "llama.cpp's error lines"}``. Anything native code prints to stdout is
sent to stderr instead, so the protocol stream carries only those lines.

The quantizer is a single blocking C call that neither Ctrl-C nor a Python exception can stop;
in a child process the parent can end it at once (and a llama.cpp abort ends only the child).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO

from edge_runtime.converters.worker_process import open_protocol, send


class _LineForwarder(logging.Handler):
    def __init__(self, stream: IO[str]) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        send(self.stream, log=record.levelno, text=record.getMessage())


def main(argv: list[str]) -> int:
    """Quantize as the JSON request in ``argv[1]`` says; return llama.cpp's status."""
    request = json.loads(argv[1])
    protocol = open_protocol()  # the parent owns Ctrl-C: it kills this process, removes the partial file

    from edge_runtime.backends.llamacpp import quantize

    logger = logging.getLogger("edge_runtime.llama_cpp")  # where the backend routes llama.cpp's log
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(_LineForwarder(protocol))
    rc, errors = quantize(request["src"], request["dst"], ftype=int(request["ftype"]),
                          nthread=int(request["nthread"]), allow_requantize=bool(request["allow_requantize"]))
    send(protocol, rc=rc, errors=errors)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
