"""Vetting an artifact before this process opens it: its files checked, and a file never loaded
cleanly before tried first in a child process.

Model files are untrusted input and native runtimes abort the whole process on some of their
asserts (llama.cpp's ``GGML_ASSERT`` on a vocabulary with a duplicated token, for one). Our own
format checks stop the known cases; for the rest, the first load of a file (or of a changed one)
happens in a child (``python -m edge_runtime.backends.trial_load BACKEND PATH``) with a tiny
context and a two-token generation, under a timeout. A child killed by a signal or the timeout
becomes a one-line ``ModelFormatError`` and the caller lives on; a clean run is remembered by the
file's sha256 and its purpose, generation or embeddings (``models.trust``), so the next start for
that purpose pays nothing. ``EDGERT_TRIAL_LOAD=0`` turns
the trial off for a process that is itself the isolation (a fuzzer's worker).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_runtime import errors
from edge_runtime.errors import EdgeRuntimeError, ModelFormatError, ModelLoadError

if TYPE_CHECKING:
    from edge_runtime.models.artifact import Artifact

log = logging.getLogger(__name__)
TRIAL_TIMEOUT_S = 120.0  # start, imports and a two-token generation, on the slowest board
TRIAL_READ_BYTES_PER_S = 25e6  # plus the time a slow SD card takes to read the file once
TRIAL_CTX = 64
_HINT = "the file is damaged or was made to crash its runtime: convert or download it again"


def trial_loads_enabled() -> bool:
    """Whether never-tried files are loaded in a child first (``EDGERT_TRIAL_LOAD=0``: not)."""
    return os.environ.get("EDGERT_TRIAL_LOAD", "1") != "0"


def vet_artifact(artifact: Artifact, backend: str, *, embeddings: bool = False) -> None:
    """Check an artifact's files and, on its first load, try it in a child process (an artifact
    still in the pieces its package ships is joined first); ``embeddings`` tries it as an
    embedding model (an encoder such as BERT generates nothing)."""
    from edge_runtime.formats.deep_checks import check_deeply
    from edge_runtime.models.trust import check_artifact, remember_trusted

    if artifact.parts and not os.path.isfile(artifact.path):
        from edge_runtime.models.embedded import join_parts

        join_parts(artifact.parts, artifact.path, artifact.sha256)
    trial = trial_loads_enabled()
    purpose = "embeddings" if embeddings else "generation"
    verdict = check_artifact(artifact, need_sha256=trial, purpose=purpose)
    if verdict.trusted:
        return
    check_deeply(artifact.path, artifact.format)
    if trial and verdict.sha256 is not None:
        trial_load(artifact.path, backend, embeddings=embeddings)
        # Trusted for this purpose only: an encoder that embeds cleanly may still abort generating.
        remember_trusted(verdict.sha256, purpose)


def trial_timeout_s(path: str) -> float:
    """How long a trial of ``path`` may take before it counts as hung."""
    target = Path(path)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) if target.is_dir() else target.stat().st_size
    return TRIAL_TIMEOUT_S + size / TRIAL_READ_BYTES_PER_S


def trial_load(path: str, backend: str, *, embeddings: bool = False) -> None:
    """Load ``path`` on ``backend`` in a child and generate two tokens (or, ``embeddings``, embed a
    word); raise what went wrong."""
    import subprocess  # here, not at import: a file tried before costs nothing at start

    timeout = trial_timeout_s(path)
    log.info("first load of %s: trying it in a child process", path)
    command = [sys.executable, "-m", "edge_runtime.backends.trial_load", backend, str(path),
               *(["embeddings"] if embeddings else [])]
    env = {**os.environ, "EDGERT_TRIAL_LOAD": "0"}
    try:
        proc = subprocess.run(command, capture_output=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:  # run() has killed the child
        raise ModelFormatError(f"{path}: loading it did not finish within {timeout:.0f} s "
                               f"(tried in a child process, which was stopped)", _HINT) from None
    report = _last_json_line(proc.stdout)
    if proc.returncode < 0:
        why = _signal_name(-proc.returncode)
        native = _native_complaint(proc.stderr)
        raise ModelFormatError(f"{path}: the {backend} runtime crashed loading it ({why}"
                               f"{': ' + native if native else ''}; tried in a child process)", _HINT)
    if report is None or proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(f"{path}: the trial load exited with code {proc.returncode} ({tail[0][:200]})",
                             "run again with EDGERT_DEBUG=1 to see why")
    if not report.get("ok"):
        raise _as_error(report)


def _last_json_line(stdout: bytes) -> dict[str, Any] | None:
    for line in reversed(stdout.decode("utf-8", errors="replace").splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        return data if isinstance(data, dict) else None
    return None


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _native_complaint(stderr: bytes) -> str | None:
    """The assert or error line a runtime printed before dying, trimmed to one short line."""
    for line in reversed(stderr.decode("utf-8", errors="replace").splitlines()):
        if "GGML_ASSERT" in line or "error" in line.lower() or "abort" in line.lower():
            text = line[line.find("GGML_ASSERT"):] if "GGML_ASSERT" in line else line.strip()
            return text if len(text) <= 160 else text[:157] + "..."
    return None


def _as_error(report: dict[str, Any]) -> EdgeRuntimeError:
    """The child's error, raised here as the same class (a ModelLoadError for anything else)."""
    cls = getattr(errors, str(report.get("class")), None)
    message, hint = str(report.get("message")), report.get("hint")
    hint = hint if isinstance(hint, str) else None
    if isinstance(cls, type) and issubclass(cls, EdgeRuntimeError) and cls.__init__ is EdgeRuntimeError.__init__:
        return cls(message, hint)
    return ModelLoadError(message, hint)


def _trial(backend: str, path: str, embeddings: bool = False) -> dict[str, Any]:
    """In the child: load with a tiny context on the CPU and generate two greedy tokens (or embed one word)."""
    from edge_runtime.backends import load_backend
    from edge_runtime.backends.base import SamplingParams, Settings

    settings = Settings(n_ctx=TRIAL_CTX, n_threads=min(2, os.cpu_count() or 1), n_batch=TRIAL_CTX,
                        n_ubatch=TRIAL_CTX, n_gpu_layers=0)
    if embeddings:
        with load_backend(backend).load_embedder(path, settings) as embedder:  # type: ignore[attr-defined]
            embedder.embed(["Hello"], truncate=True)
        return {"ok": True}
    with load_backend(backend).load(path, settings) as model:
        tokens = model.tokenize("Hello", add_bos=True)[:8] or [0]
        for _ in model.generate(tokens, SamplingParams(max_tokens=2, temperature=0.0)):
            pass
    return {"ok": True}


def main(argv: list[str]) -> int:
    """``python -m edge_runtime.backends.trial_load BACKEND PATH [embeddings]``: one JSON line on stdout."""
    backend, path, *use = argv
    try:
        report = _trial(backend, path, use == ["embeddings"])
    except EdgeRuntimeError as exc:
        report = {"ok": False, "class": type(exc).__name__, "message": exc.message, "hint": exc.hint}
    except Exception as exc:  # a bug of ours on this file: said as one line, the traceback on stderr
        import traceback

        traceback.print_exc()
        report = {"ok": False, "class": "internal", "message": f"{path}: {type(exc).__name__}: {exc}",
                  "hint": "run again with EDGERT_DEBUG=1"}
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
