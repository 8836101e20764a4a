"""One bench job, run in its own child process so its peak RSS and load time are its own.

The parent (``bench.run_in_child``) starts ``python -m edge_runtime.bench.worker``, writes the job
as JSON on its stdin and reads messages from its stdout: lines starting with ``MARKER``, each a
JSON object ``{"step": label}`` after every timed generation (the parent's progress bar), then
``{"done": figures}`` or ``{"error": {"class", "message", "hint"}}``. Other stdout lines (a native
library printing) are ignored. A fresh interpreter, not ``multiprocessing``: its high-water mark
counts only this artifact, and it never re-imports the caller's ``__main__`` module (which fails
in a script without an ``if __name__ == "__main__"`` guard).

A job with ``"anatomy": true`` measures the latency anatomy instead (``bench.anatomy``).

Everything goes through ``Model.generate``, the stream users get (ARCHITECTURE.md): each timed run
resets the model's KV cache first, so every repetition evaluates its whole prompt.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from edge_runtime.device.sensors import (
    EnergyCounter,
    VramProbe,
    cpu_temperature_c,
    load_average,
    peak_rss_bytes,
    rss_now_bytes,
)

MARKER = "edgert-bench-worker: "


def _send(kind: str, value: Any) -> None:
    sys.stdout.write(MARKER + json.dumps({kind: value}) + "\n")
    sys.stdout.flush()


def main() -> int:
    """Child-process entry point: read the job from stdin, measure it, report on stdout."""
    from edge_runtime.errors import EdgeRuntimeError

    try:
        job = json.loads(sys.stdin.read())
        if job.get("anatomy"):
            from edge_runtime.bench.anatomy import measure_anatomy

            _send("done", measure_anatomy(job, lambda label: _send("step", label), prompt_tokens))
        else:
            _send("done", measure(job, lambda label: _send("step", label)))
        return 0
    except KeyboardInterrupt:
        _send("error", {"class": "KeyboardInterrupt", "message": "interrupted", "hint": None})
        return 130
    except EdgeRuntimeError as exc:
        _send("error", {"class": type(exc).__name__, "message": exc.message, "hint": exc.hint})
        return 1
    except Exception as exc:
        import traceback

        _send("error", {"class": "internal", "message": f"{type(exc).__name__}: {exc}",
                        "hint": traceback.format_exc()})
        return 1


def measure(job: dict[str, Any], step: Any = None) -> dict[str, Any]:
    """Load, warm up, and time prefill (one run per prompt length) and decode, ``reps`` times."""
    step = step or (lambda label: None)
    rss_baseline = rss_now_bytes()  # before the runtime is imported: the estimate counts that too
    method = job["method"]
    energy = EnergyCounter()
    vram = VramProbe()
    temperature_before, load_before = cpu_temperature_c(), load_average()

    from edge_runtime.backends import load_backend
    from edge_runtime.backends.base import Settings
    from edge_runtime.backends.trial_load import vet_artifact
    from edge_runtime.models.artifact import Artifact

    # open_artifact's checks, outside the timed load: a first load hashes and tries the file once.
    vet_artifact(Artifact.from_dict(job["artifact"]), job["backend"])
    start = time.perf_counter()
    backend = load_backend(job["backend"])
    import_s = time.perf_counter() - start
    start = time.perf_counter()
    model = backend.load(job["artifact_path"], Settings.from_dict(job["settings"]))
    load_s = time.perf_counter() - start
    vram.sample()
    try:
        tokens = prompt_tokens(model, job["prompt_text"], max(method["prompt_tokens"]))
        samples: list[dict[str, Any]] = []
        notes: list[str] = []
        rounds = [(True, i) for i in range(method["warmup"])] + [(False, i) for i in range(method["reps"])]
        for warmup, rep in rounds:
            tag = f"warm-up {rep + 1}" if warmup else f"rep {rep + 1}/{method['reps']}"
            for n in method["prompt_tokens"]:
                samples.append(_timed(model, tokens[:n], 1, "prefill", rep, warmup, energy))
                vram.sample()
                step(f"{tag} · prompt {n}")
            decode = _timed(model, tokens[: method["decode_prompt_tokens"]], method["gen_tokens"],
                            "decode", rep, warmup, energy)
            samples.append(decode)
            vram.sample()
            if decode["gen_tokens"] < method["gen_tokens"] and not warmup:
                notes.append(f"{tag}: generation stopped after {decode['gen_tokens']} of "
                             f"{method['gen_tokens']} tokens ({decode['finish_reason']})")
            step(f"{tag} · decode {method['gen_tokens']}")
        info = model.info.to_dict()
        n_threads = getattr(model, "n_threads", None)
    finally:
        model.close()
    return {
        "import_s": import_s,
        "load_s": load_s,
        "rss_baseline_bytes": rss_baseline,
        "peak_rss_bytes": peak_rss_bytes(),
        "vram_peak_bytes": vram.peak,
        "vram_note": vram.reason,
        "temperature_before_c": temperature_before,
        "temperature_after_c": cpu_temperature_c(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "energy_available": energy.available,
        "energy_note": energy.reason,
        "model_info": info,
        "n_threads": n_threads,
        "n_ctx": info.get("n_ctx"),
        "samples": samples,
        "notes": notes,
    }


def prompt_tokens(model: Any, text: str, n: int) -> list[int]:
    """At least ``n`` tokens of ``text`` (repeated when short), BOS first where the model wants it."""
    tokens = model.tokenize(text, add_bos=model.info.add_bos)
    if not tokens:
        from edge_runtime.errors import InvalidConfigError

        raise InvalidConfigError("the bench prompt text tokenizes to nothing", "give another --prompt-file")
    body = model.tokenize(text) or tokens
    while len(tokens) < n:
        tokens += body
    return tokens[:n]


def _timed(model: Any, tokens: list[int], max_tokens: int, kind: str, rep: int, warmup: bool,
           energy: EnergyCounter) -> dict[str, Any]:
    """One generation from an empty cache, greedy, with its timings and energy."""
    from edge_runtime.backends.base import SamplingParams

    reset = getattr(model, "reset", None)
    if reset is not None:
        reset()  # the next call evaluates the whole prompt: a repetition, not a cache hit
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    at_start = energy.read_uj() if energy.available else None
    at_first = None
    last = None
    for event in model.generate(tokens, params):
        if at_first is None and event.token is not None and energy.available:
            at_first = energy.read_uj()
        last = event
    at_end = energy.read_uj() if energy.available else None
    stats = last.stats if last is not None else None
    if stats is None:
        raise RuntimeError("the generation stream ended without stats")
    prefill_j = energy.joules_between(at_start, at_first)
    decode_j = energy.joules_between(at_first, at_end) if stats.gen_tokens > 1 else None
    return {
        "rep": rep,
        "warmup": warmup,
        "kind": kind,
        "prompt_tokens": stats.prompt_tokens,
        "evaluated_tokens": stats.evaluated_tokens,
        "cached_tokens": stats.cached_tokens,
        "gen_tokens": stats.gen_tokens,
        "ttft_ms": stats.ttft_s * 1000,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "prefill_tok_s": stats.prefill_tok_s,
        "decode_tok_s": stats.decode_tok_s,
        "prefill_j": prefill_j,
        "decode_j": decode_j,
        "finish_reason": last.finish_reason if last is not None else None,
    }


if __name__ == "__main__":
    sys.exit(main())
