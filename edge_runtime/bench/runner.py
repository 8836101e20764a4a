"""``edgert bench``: llama-bench's method through the stream users get, plus what it leaves out.

For each artifact × backend × thread count, a fresh child process (see ``bench_worker``) loads the
model with the plan's settings and, after ``warmup`` discarded rounds, runs ``reps`` rounds of:

- one generation of a single token per prompt length (``--prompt-tokens``): time to first token
  and prompt-processing speed (the largest length is the headline ``prefill_tok_s``, like
  llama-bench's pp512);
- one generation of ``--gen-tokens`` after the shortest prompt (``decode_prompt_tokens``):
  decode speed, tokens after the first over the time after the first (llama-bench's tg).

Every run starts from an empty KV cache, greedy, through ``Model.generate``. Means and sample
standard deviations are reported with every raw sample. Around them: load time, peak RSS (the
child's own high-water mark), VRAM, CPU temperature before and after, energy per token (RAPL),
and the roofline (``roofline.py``) from one bandwidth measurement per run.

Prompt text: ``--prompt-file``, else the Python documentation every installation carries
(``pydoc_data.topics``), else (a Python without it) a paragraph built into this module, repeated.
Speeds hardly depend on which tokens are fed; ``method.prompt_source`` records it.
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.bench.result import ArtifactResult, BenchMethod, BenchRequest, BenchResult
from edge_runtime.errors import DoesNotFitError, EdgeRuntimeError, InvalidConfigError
from edge_runtime.sample_text import SOURCE_NAME, python_docs_text

BUILTIN_PROMPT = (
    "The harbour town woke slowly. Fishing boats came in against the grey light, gulls circled the "
    "masts, and the market filled with baskets of silver fish, bread still warm from the ovens, "
    "and the smell of tar and rope. An old clockmaker opened his shutters and set the hands of "
    "every clock in the window to the same minute, as he had done for forty years. Children ran "
    "down the steep lanes to the water, and the schoolmaster followed them, calling out the names "
    "of the ships as if they were pupils late for a lesson. By noon the wind had turned, the tide "
    "was high, and the whole town seemed to lean toward the sea. "
)


# Where the bench reports progress: (the row's label, steps done, steps in all, the step just done).
BenchProgress = Callable[[str, int, int, str], None]


def prompt_text(prompt_file: str | None, n_tokens: int) -> tuple[str, str]:
    """(text, where it came from) for the bench prompts; only as much as ``n_tokens`` needs."""
    chars = max(4096, n_tokens * 16)  # tokens are rarely longer than 16 characters
    if prompt_file:
        try:
            text = Path(prompt_file).read_text(encoding="utf-8", errors="replace")[:chars]
        except OSError as exc:
            raise InvalidConfigError(f"cannot read --prompt-file {prompt_file}: {exc.strerror}") from exc
        if not text.strip():
            raise InvalidConfigError(f"--prompt-file {prompt_file} is empty", "give a text file")
        return text, f"file {Path(prompt_file).name}"
    try:
        return python_docs_text(chars), SOURCE_NAME
    except EdgeRuntimeError:
        pass
    return BUILTIN_PROMPT * max(1, chars // len(BUILTIN_PROMPT)), "built-in paragraph, repeated"


def _check(request: BenchRequest) -> None:
    problems = []
    if request.reps < 1:
        problems.append("--reps must be at least 1")
    if request.warmup < 0:
        problems.append("--warmup cannot be negative")
    if request.gen_tokens < 2:
        problems.append("--gen-tokens must be at least 2 (decode speed counts the tokens after the first)")
    if not request.prompt_tokens or min(request.prompt_tokens) < 1:
        problems.append("--prompt-tokens needs positive lengths, e.g. 32,128,512")
    if problems:
        raise InvalidConfigError("; ".join(problems))


def run_bench(request: BenchRequest, progress: BenchProgress | None = None) -> BenchResult:
    """Measure every artifact × backend × threads the request names; see the module docstring."""
    from importlib.metadata import PackageNotFoundError, version

    from edge_runtime.bench.roofline import bandwidth_buffer_bytes, measure_bandwidth
    from edge_runtime.device import detect
    from edge_runtime.planning.profiles import get_profile, match_profile

    _check(request)
    prompts = tuple(sorted(set(request.prompt_tokens)))
    need = max(prompts[-1] + 1, prompts[0] + request.gen_tokens) + 1
    if request.ctx is not None and request.ctx < need:
        raise InvalidConfigError(
            f"--ctx {request.ctx} cannot hold a {prompts[-1]}-token prompt and {request.gen_tokens} "
            f"generated tokens", f"use --ctx {need} or more, or shorter --prompt-tokens/--gen-tokens")
    artifacts = _artifacts(request.models)
    device = detect()
    profile = get_profile(request.profile) if request.profile else match_profile(device)
    jobs, skipped = _plan_jobs(artifacts, device, profile, request, need)
    if not jobs:
        raise DoesNotFitError("nothing to benchmark: " + "; ".join(f"{s['artifact']}: {s['why']}" for s in skipped),
                              "pick another --model, --backend or --ctx")
    text, source = prompt_text(request.prompt_file, prompts[-1])
    method = BenchMethod(
        reps=request.reps, warmup=request.warmup,
        threads=tuple(sorted({plan.settings.n_threads or 1 for plan in jobs})), prompt_tokens=prompts,
        gen_tokens=request.gen_tokens, decode_prompt_tokens=prompts[0], ctx=request.ctx,
        backends=request.backends, prompt_source=source,
    )
    report = progress or (lambda label, done, total, step: None)
    report("memory bandwidth", 0, 1, "")
    buffer = bandwidth_buffer_bytes(device.memory.available_bytes, request.bandwidth_buffer_bytes or 512 << 20)
    bandwidth = measure_bandwidth(buffer, threads=max(method.threads))
    report("memory bandwidth", 1, 1, "")
    results = []
    for plan in jobs:
        steps = (request.warmup + request.reps) * (len(prompts) + 1)
        label = f"{plan.artifact.label} · {plan.backend} · {plan.settings.n_threads} threads"
        report(label, 0, steps, "")
        job = {"artifact_path": plan.artifact.path, "artifact": plan.artifact.to_dict(), "backend": plan.backend,
               "settings": plan.settings.to_dict(), "method": method.to_dict(), "prompt_text": text}
        try:
            raw = run_in_child(job, _counting(report, label, steps))
        except EdgeRuntimeError as exc:
            if len(jobs) == 1:
                raise
            skipped.append({"artifact": plan.artifact.label, "backend": plan.backend,
                            "threads": plan.settings.n_threads, "why": exc.message})
            continue
        results.append(summarize(plan, method, raw, bandwidth.bytes_s))
    if not results:
        raise EdgeRuntimeError("every benchmark failed: " + "; ".join(s["why"] for s in skipped))
    if request.anatomy:
        results = _with_anatomy(results, jobs, method, text, report)
    try:
        edgert_version = version("edge-runtime")
    except PackageNotFoundError:
        edgert_version = "unknown"
    return BenchResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), edgert_version=edgert_version,
        device=device.to_dict(), profile=_profile_summary(profile), method=method,
        memory_bandwidth=bandwidth.to_dict(), results=tuple(results),
        recommendation=_recommendation(artifacts, device, profile, request), skipped=tuple(skipped),
    )


def _with_anatomy(results: list[ArtifactResult], jobs: list[Any], method: BenchMethod, text: str,
                  report: BenchProgress) -> list[ArtifactResult]:
    """The result at the most threads of each artifact and backend, with its anatomy (one per pair:
    the anatomy measures 1..N threads itself); a failed anatomy is a note, never the lost bench."""
    out = list(results)
    widest: dict[tuple[str, str], int] = {}  # (path, backend) -> index of its result at the most threads
    for i, r in enumerate(out):
        key = (r.artifact["path"], r.backend)
        if key not in widest or r.threads > out[widest[key]].threads:
            widest[key] = i
    for key, i in widest.items():
        plan = max((p for p in jobs if (p.artifact.path, p.backend) == key), key=lambda p: p.settings.n_threads or 1)
        label = f"{plan.artifact.label} · {plan.backend} · anatomy"
        report(label, 0, 5, "")
        job = {"anatomy": True, "artifact_path": plan.artifact.path, "artifact": plan.artifact.to_dict(),
               "backend": plan.backend, "settings": plan.settings.to_dict(), "method": method.to_dict(),
               "prompt_text": text}
        try:
            anatomy = run_in_child(job, _counting(report, label, 5))
        except EdgeRuntimeError as exc:
            out[i] = replace(out[i], notes=(*out[i].notes, f"anatomy not measured: {exc.message}"))
            continue
        compute = {**anatomy["compute"], "roofline_ceiling_tok_s": out[i].decode_ceiling_tok_s}
        out[i] = replace(out[i], anatomy={**anatomy, "compute": compute})
    return out


def _counting(report: BenchProgress, label: str, total: int) -> Callable[[str], None]:
    """A child's step callback that reports each step as one more of ``total`` on the row ``label``."""
    done = itertools.count(1)
    return lambda step: report(label, next(done), total, step)


def _artifacts(models: tuple[str | None, ...]) -> list[Any]:
    from edge_runtime.models.spec import find_artifacts

    found, seen = [], set()
    for spec in models or (None,):
        for artifact in find_artifacts(spec):
            key = str(Path(artifact.path).resolve())
            if key not in seen:
                seen.add(key)
                found.append(artifact)
    return found


def _plan_jobs(artifacts: list[Any], device: Any, profile: Any, request: BenchRequest,
               need: int) -> tuple[list[Any], list[dict[str, Any]]]:
    """One plan per artifact × backend × threads; what cannot run is skipped with why."""
    from edge_runtime import planning

    jobs, skipped = [], []
    for artifact in artifacts:
        for backend in request.backends or (None,):
            for threads in request.threads or (None,):
                plan_with = functools.partial(planning.plan, artifact, backend=backend, threads=threads,
                                              device=device, profile=profile, workers=request.workers)
                try:
                    plan = plan_with(ctx=request.ctx)
                    if plan.settings.n_ctx < need:  # the profile's default context is too short
                        plan = plan_with(ctx=need)
                except DoesNotFitError as exc:
                    skipped.append({"artifact": artifact.label, "backend": backend or "auto",
                                    "threads": threads, "why": exc.message})
                    continue
                jobs.append(plan)
    return jobs, skipped


def run_in_child(job: dict[str, Any], on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one job in ``python -m edge_runtime.bench.worker``; re-raise its error in this process."""
    import json
    import os
    import subprocess
    import sys

    from edge_runtime import errors
    from edge_runtime.bench.worker import MARKER

    # The child must import this very edge_runtime, however this process found it.
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    child = subprocess.Popen([sys.executable, "-m", "edge_runtime.bench.worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(job))
        child.stdin.close()
        for line in child.stdout:
            if not line.startswith(MARKER):
                continue  # a native library writing to stdout
            message = json.loads(line[len(MARKER):])
            if "step" in message:
                if on_step is not None:
                    on_step(message["step"])
            elif "done" in message:
                return message["done"]
            else:
                raise _child_error(message["error"], errors)
        code = child.wait()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        raise errors.ModelLoadError(f"the bench process died ({how}) measuring {job['artifact_path']}",
                                    "run the model alone (edgert run) to see why it fails")
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()


def _child_error(error: dict[str, Any], errors: Any) -> BaseException:
    """The exception the child reported, as the same class in this process."""
    import os
    import sys

    name, text, hint = error.get("class"), error.get("message", "?"), error.get("hint")
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    if name == "internal":
        if os.environ.get("EDGERT_DEBUG") and hint:
            sys.stderr.write(hint)  # the child's traceback
        return EdgeRuntimeError(f"the bench process failed: {text}", "EDGERT_DEBUG=1 shows its traceback")
    # Built through the base initializer: some subclasses take other arguments.
    cls = getattr(errors, str(name), EdgeRuntimeError)
    if not (isinstance(cls, type) and issubclass(cls, EdgeRuntimeError)):
        cls = EdgeRuntimeError
    exc = EdgeRuntimeError.__new__(cls)
    EdgeRuntimeError.__init__(exc, text, hint)
    return exc


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(plan: Any, method: BenchMethod, raw: dict[str, Any], bandwidth_bytes_s: float) -> ArtifactResult:
    """Means, deviations, roofline and energy of one job's raw samples."""
    from edge_runtime.bench.roofline import roofline, token_traffic
    from edge_runtime.formats.gguf import read_gguf_header

    timed = [s for s in raw["samples"] if not s["warmup"]]
    # A run that hit end-of-text at once has no decode speed; its note says so (bench_worker).
    decode = [s for s in timed if s["kind"] == "decode" and s["gen_tokens"] > 1]
    decode_mean, decode_sd = _mean_sd([s["decode_tok_s"] for s in decode])
    ttft, ttft_sd, prefill_by = {}, {}, {}
    for n in method.prompt_tokens:
        runs = [s for s in timed if s["kind"] == "prefill" and s["prompt_tokens"] == n]
        ttft[str(n)], ttft_sd[str(n)] = _mean_sd([s["ttft_ms"] for s in runs])
        prefill_by[str(n)] = _mean_sd([s["prefill_tok_s"] for s in runs])[0]
    prefill_mean, prefill_sd = _mean_sd([s["prefill_tok_s"] for s in timed if s["kind"] == "prefill"
                                         and s["prompt_tokens"] == method.prompt_tokens[-1]])
    gen_mean = statistics.fmean(s["gen_tokens"] for s in decode) if decode else None
    notes = list(raw["notes"])
    roof: dict[str, Any] | None = None
    if plan.artifact.format == "gguf" and bandwidth_bytes_s > 0:
        position = method.decode_prompt_tokens + (gen_mean or method.gen_tokens) / 2
        header = read_gguf_header(plan.artifact.path, parts=plan.artifact.parts)
        traffic = token_traffic(header, position, plan.settings.type_k, plan.settings.type_v)
        roof = roofline(bandwidth_bytes_s, traffic, decode_mean).to_dict()
        if plan.settings.n_gpu_layers:
            notes.append("layers run on the GPU: the roofline uses host RAM bandwidth, a bound for the CPU part only")
    if plan.settings.rpc_servers:
        notes.append(f"split across the workers {', '.join(plan.settings.rpc_servers)}: the model runs in a child "
                     "process and on them, so peak RSS here counts neither")
    baseline, peak = raw["rss_baseline_bytes"], raw["peak_rss_bytes"]
    ceiling = roof["ceiling_tok_s"] if roof else None
    return ArtifactResult(
        artifact=plan.artifact.to_dict(), backend=plan.backend,
        threads=raw["n_threads"] or plan.settings.n_threads or 1,
        settings=plan.settings.to_dict(), decode_tok_s=decode_mean, decode_tok_s_sd=decode_sd,
        prefill_tok_s=prefill_mean, prefill_tok_s_sd=prefill_sd, prefill_prompt_tokens=method.prompt_tokens[-1],
        ttft_ms=ttft, ttft_ms_sd=ttft_sd, prefill_tok_s_by_prompt=prefill_by, gen_tokens_mean=gen_mean,
        load_s=raw["load_s"], peak_rss_bytes=peak, rss_baseline_bytes=baseline,
        peak_rss_increase_bytes=peak - baseline if peak is not None and baseline is not None else None,
        estimated_memory_bytes=plan.memory.total_bytes, vram_peak_bytes=raw["vram_peak_bytes"],
        memory_bandwidth_gbs=bandwidth_bytes_s / 1e9,
        decode_ceiling_tok_s=ceiling if ceiling is not None and math.isfinite(ceiling) else None,
        roofline=roof, samples=tuple(raw["samples"]),
        temperature_c={"before": raw["temperature_before_c"], "after": raw["temperature_after_c"]},
        load_average={"before": raw["load_average_before"], "after": raw["load_average_after"]},
        energy=_energy(raw, timed, method), plan=plan.to_dict(), model=raw["model_info"], notes=tuple(notes),
    )


def _energy(raw: dict[str, Any], timed: list[dict[str, Any]], method: BenchMethod) -> dict[str, Any]:
    if not raw["energy_available"]:
        return {"available": False, "source": None, "note": f"not available: {raw['energy_note']}"}
    decode = [s["decode_j"] / (s["gen_tokens"] - 1) for s in timed
              if s["kind"] == "decode" and s.get("decode_j") is not None and s["gen_tokens"] > 1]
    prefill = [s["prefill_j"] / s["evaluated_tokens"] for s in timed
               if s["kind"] == "prefill" and s["prompt_tokens"] == method.prompt_tokens[-1]
               and s.get("prefill_j") is not None and s["evaluated_tokens"]]
    return {"available": True, "source": "intel-rapl package counters (whole CPU, other programs included)",
            "decode_j_per_token": statistics.fmean(decode) if decode else None,
            "prefill_j_per_token": statistics.fmean(prefill) if prefill else None, "note": None}


def _profile_summary(profile: Any) -> dict[str, Any]:
    return {"id": profile.id, "description": profile.description, "floor": asdict(profile.floor)}


def _recommendation(artifacts: list[Any], device: Any, profile: Any, request: BenchRequest) -> dict[str, Any] | None:
    """What ``edgert plan`` would run among the benchmarked artifacts (or why nothing fits)."""
    from edge_runtime import planning

    try:
        return planning.plan(artifacts, ctx=request.ctx, device=device, profile=profile).to_dict()
    except EdgeRuntimeError as exc:
        return {"error": exc.message}
