#!/usr/bin/env python3
"""Decode speed of `edgert run` against llama-cpp-python's `create_completion` and native llama.cpp.

Runners on the same GGUF file, thread count, context (n_ctx) and greedy prompt, each producing
the same number of tokens (edgert and llama-bench with flash attention and edgert's batch size):

- ``edgert run``: the real command in a subprocess with ``--stats`` and its output going to a
  file; the figure is the ``decode_tok_s`` it reports (tokens after the first over the time
  from the first token to the end). The targets are judged on this row: the issue asks for the
  speed of the command, fresh process included.
- ``edgert generate (lib)``: the library call the command makes, the model loaded once in a
  worker process, timed where the tokens arrive (informational).
- llama-cpp-python's high-level ``Llama.create_completion(stream=True)`` in a worker process of
  its own, timed the same way: first streamed chunk to the end of the stream. Twice: as a user
  calls it (same threads and context, its own defaults otherwise: the issue's comparison), and
  tuned with edgert's settings (flash attention, batch size), which leaves only the Python loop.
- native llama.cpp through ``llama-bench`` (PATH or ./bin/llama-bench, built by
  ``scripts/build_llama_tools.sh``): its ``tg`` test with the KV cache pre-filled to the prompt's
  length (``-d``), so every runner decodes at the same depth.

The runners take turns (A, B, C, D, A, B, C, D, ...) for ``--reps`` rounds after one warm-up round,
and the table shows medians. Targets: edgert ≥ 0.95 × native and ≥ 1.08 × create_completion;
the per-token overhead over native (1000/edgert − 1000/native, in ms) is printed too.
The script reports; it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from executables import find_edgert, find_llama_tool

from edge_runtime.backends.base import default_threads

LIBRARY, COMPLETION, TUNED = "edgert generate (lib)", "create_completion", "create_completion, tuned"
DEFAULT_PROMPT = (
    "The following is a detailed history of the city of Rome, from its legendary founding to "
    "the present day.\n\nChapter 1."
)


@dataclass(frozen=True)
class Sample:
    """One timed run of one runner."""

    tok_s: float
    gen_tokens: int | None = None
    prompt_tokens: int | None = None
    text: str | None = None
    reported_tok_s: float | None = None  # the backend's own figure, where there is one


def parse_stats_line(stderr: str) -> dict[str, float]:
    """The last ``key=value ...`` line that ``--stats`` writes on stderr, as numbers."""
    for line in reversed(stderr.splitlines()):
        if "decode_tok_s=" in line:
            return {k: float(v) for k, v in re.findall(r"(\w+)=([-\d.]+)", line)}
    raise RuntimeError(f"edgert printed no --stats line; stderr was:\n{stderr[-2000:]}")


class EdgertRunner:
    """``edgert run`` in a subprocess; the speed is the one its ``--stats`` line reports."""

    name = "edgert run"

    def __init__(self, model: str, args: argparse.Namespace) -> None:
        self.command = [
            find_edgert(), "run", args.prompt, "--model", model, "--temp", "0",
            "--max-tokens", str(args.tokens), "--threads", str(args.threads),
            "--ctx", str(args.ctx), "--stats",
        ]

    def run(self) -> Sample:
        # Output to files (`edgert run ... > out.txt`), not pipes: a reader waking up for every
        # token would take a core from llama.cpp's threads on a small machine and skew the figure.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            code = subprocess.run(self.command, stdout=out, stderr=err, check=False).returncode
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
        if code != 0:
            raise RuntimeError(f"edgert run exited {code}:\n{stderr[-2000:]}")
        stats = parse_stats_line(stderr)
        text = stdout[:-1] if stdout.endswith("\n") else stdout
        return Sample(stats["decode_tok_s"], int(stats["gen_tokens"]), int(stats["prompt_tokens"]), text)


class EdgertLibraryEngine:
    """The library call ``edgert run`` makes (``Model.generate``), with the model loaded once."""

    def __init__(self, model: str, args: argparse.Namespace, n_batch: int) -> None:
        from edge_runtime import load
        from edge_runtime.backends.base import SamplingParams, Settings

        self.model = load(model, Settings(n_ctx=args.ctx, n_threads=args.threads))
        self.tokens = self.model.tokenize(args.prompt, special=True, add_bos=self.model.info.add_bos)
        self.params = SamplingParams(temperature=0.0, max_tokens=args.tokens)

    def verify(self) -> Sample:
        return self.run()

    def run(self) -> Sample:
        self.model.reset()  # evaluate the whole prompt, as `edgert run` does
        pieces: list[str] = []
        stats, first = None, None
        for event in self.model.generate(self.tokens, self.params):
            if first is None:
                first = time.perf_counter()
            pieces.append(event.text)
            stats = event.stats or stats
        end = time.perf_counter()
        assert stats is not None
        # Timed where the tokens arrive, exactly as create_completion is; the backend's own
        # figure (taken where they are produced) is kept for comparison.
        tok_s = (stats.gen_tokens - 1) / (end - first) if first and end > first and stats.gen_tokens > 1 else 0.0
        return Sample(tok_s, stats.gen_tokens, stats.prompt_tokens, "".join(pieces), stats.decode_tok_s)


class CreateCompletionEngine:
    """llama-cpp-python's high-level API, streaming, as a user calls it: the same model, threads
    and context, everything else its defaults (flash attention off, its own batch size)."""

    tuned = False

    def __init__(self, model: str, args: argparse.Namespace, n_batch: int) -> None:
        from llama_cpp import Llama

        self.args = args
        same = {"n_batch": n_batch, "n_ubatch": n_batch, "flash_attn": True} if self.tuned else {}
        self.llm = Llama(model_path=model, n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                         n_gpu_layers=0, verbose=False, **same)
        self.gen_tokens: int | None = None

    def _completion_kwargs(self) -> dict[str, Any]:
        return {"max_tokens": self.args.tokens, "temperature": 0.0, "repeat_penalty": 1.0}

    def verify(self) -> Sample:
        """An untimed, non-streamed run: the exact token count (from usage) and the text."""
        self.llm.reset()
        out: Any = self.llm.create_completion(self.args.prompt, **self._completion_kwargs())
        self.gen_tokens = int(out["usage"]["completion_tokens"])
        return Sample(0.0, self.gen_tokens, int(out["usage"]["prompt_tokens"]), out["choices"][0]["text"])

    def run(self) -> Sample:
        assert self.gen_tokens is not None, "verify() first"
        self.llm.reset()  # re-evaluate the prompt, as a fresh `edgert run` process does
        first: float | None = None
        pieces: list[str] = []
        for chunk in self.llm.create_completion(self.args.prompt, stream=True, **self._completion_kwargs()):
            if first is None:
                first = time.perf_counter()
            pieces.append(chunk["choices"][0]["text"])
        end = time.perf_counter()
        # Same definition as edgert's decode_tok_s: tokens after the first over the time after it.
        elapsed = end - (first or end)
        tok_s = (self.gen_tokens - 1) / elapsed if elapsed > 0 and self.gen_tokens > 1 else 0.0
        return Sample(tok_s, self.gen_tokens, None, "".join(pieces))


class TunedCreateCompletionEngine(CreateCompletionEngine):
    """The same, with every setting edgert uses (flash attention on, its batch size): what is left
    is the Python loop itself."""

    tuned = True


ENGINES = {"lib": EdgertLibraryEngine, "create_completion": CreateCompletionEngine,
           "create_completion_tuned": TunedCreateCompletionEngine}


class WorkerRunner:
    """An engine in its own long-lived child process, asked for one run at a time.

    Each engine gets a process of its own so that no two llama.cpp contexts (nor their OpenMP
    thread pools) share a process: on a busy machine that sharing alone changed the figures
    several-fold. The model stays loaded between runs.
    """

    def __init__(self, name: str, engine: str, model: str, args: argparse.Namespace) -> None:
        self.name = name
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--model", model,
                   "--threads", str(args.threads), "--tokens", str(args.tokens), "--ctx", str(args.ctx),
                   "--prompt", args.prompt]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _ask(self, request: str) -> Sample:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} worker exited ({self.proc.wait()}); see its stderr above")
        return Sample(**json.loads(line))

    def verify(self) -> Sample:
        return self._ask("verify")

    def run(self) -> Sample:
        return self._ask("run")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()


def serve_worker(args: argparse.Namespace) -> int:
    """Worker side: load the engine, then answer ``verify``/``run`` lines with JSON samples."""
    from dataclasses import asdict

    from edge_runtime.backends.base import Settings

    engine = ENGINES[args.worker](args.model, args, Settings().n_batch)
    for request in sys.stdin:
        sample = engine.verify() if request.strip() == "verify" else engine.run()
        print(json.dumps(asdict(sample)), flush=True)
    return 0


class LlamaBenchRunner:
    """Native llama.cpp: one ``llama-bench`` tg run per call (its own warm-up, ``-r 1``)."""

    name = "llama-bench (native)"

    def __init__(self, binary: str, model: str, args: argparse.Namespace, n_batch: int, depth: int) -> None:
        self.command = [
            binary, "-m", model, "-t", str(args.threads), "-p", "0", "-n", str(args.tokens),
            "-d", str(depth), "-b", str(n_batch), "-ub", str(n_batch), "-fa", "1", "-ngl", "0",
            "-r", "1", "-o", "json",
        ]

    def run(self) -> Sample:
        proc = subprocess.run(self.command, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-bench exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        tests = [t for t in json.loads(proc.stdout) if t.get("n_gen", 0) > 0]
        if not tests:
            raise RuntimeError(f"llama-bench printed no tg result:\n{proc.stdout[-2000:]}")
        return Sample(float(tests[0]["avg_ts"]), int(tests[0]["n_gen"]))


def resolve_model_path(model: str | None) -> str:
    """A file path for ``--model`` (a path or a store name; default: the embedded model)."""
    from edge_runtime.models.spec import resolve_model

    return str(resolve_model(model))


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(args: argparse.Namespace, model: str, prompt_tokens: int, n_batch: int,
                 samples: dict[str, list[Sample]], checks: list[str], load: tuple[float, float]) -> None:
    """The table of medians, then the ratios against their targets."""
    print(f"decode speed · {Path(model).name} · {args.threads} threads · {args.tokens} generated "
          f"tokens · prompt {prompt_tokens} tokens · n_ctx {args.ctx} · n_batch {n_batch} · "
          f"flash attention on (create_completion: its default, off) · greedy")
    print(f"{args.reps} repetitions interleaved after 1 warm-up round · medians · "
          f"load average {load[0]:.2f} before, {load[1]:.2f} after")
    print()
    print(f"{'runner':<24}{'median tok/s':>14}{'min':>9}{'max':>9}{'ms/token':>10}{'gen tokens':>12}")
    medians: dict[str, float] = {}
    for name, runs in samples.items():
        rates = [s.tok_s for s in runs]
        med = statistics.median(rates)
        medians[name] = med
        gen = runs[0].gen_tokens
        print(f"{name:<24}{med:>14.1f}{min(rates):>9.1f}{max(rates):>9.1f}"
              f"{1000 / med if med else float('nan'):>10.3f}{fmt(gen, 'd'):>12}")
    print()
    edgert = medians[EdgertRunner.name]
    native = medians.get(LlamaBenchRunner.name)
    high_level = medians[COMPLETION]

    def verdict(ratio: float, target: float) -> str:
        return "meets target" if ratio >= target else "BELOW target"

    r = edgert / high_level
    print(f"edgert / create_completion   {r:6.3f}   (target >= 1.08: {verdict(r, 1.08)}; same model, "
          "threads and prompt, its other settings its defaults)")
    tuned = medians.get(TUNED)
    if tuned:
        print(f"edgert / c_c tuned           {edgert / tuned:6.3f}   (informational: create_completion with "
              "edgert's flash attention and batch size)")
    library = medians.get(LIBRARY)
    if library:
        print(f"edgert run / edgert lib      {edgert / library:6.3f}   (the CLI process against the "
              "same loop loaded once)")
        reported = [r.reported_tok_s for r in samples[LIBRARY] if r.reported_tok_s]
        if reported:
            print(f"edgert lib, backend's figure {statistics.median(reported):6.1f}   tok/s (taken where "
                  "tokens are produced, not where they arrive)")
    if native:
        r = edgert / native
        print(f"edgert / native              {r:6.3f}   (target >= 0.95: {verdict(r, 0.95)})")
        print(f"overhead over native         {1000 / edgert - 1000 / native:+6.3f} ms per token")
        print(f"create_completion / native   {high_level / native:6.3f}")
    else:
        print("native llama.cpp: no llama-bench binary on PATH or in ./bin "
              "(build one with scripts/build_llama_tools.sh)")
    print()
    for line in checks:
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or store name (default: embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=default_threads(), help="threads (default: physical cores)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument("--ctx", type=int, default=2048, help="context size (default 2048)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="raw prompt (should not stop early)")
    parser.add_argument("--llama-bench", dest="llama_bench", default=None, help="llama-bench binary")
    parser.add_argument("--worker", choices=sorted(ENGINES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return serve_worker(args)

    from edge_runtime.backends.base import Settings

    n_batch = Settings().n_batch  # `edgert run` has no batch option: use its default everywhere
    model = resolve_model_path(args.model)
    load_before = os.getloadavg()[0]

    edgert = EdgertRunner(model, args)
    library = WorkerRunner(LIBRARY, "lib", model, args)
    high_level = WorkerRunner(COMPLETION, "create_completion", model, args)
    tuned = WorkerRunner(TUNED, "create_completion_tuned", model, args)
    print("warm-up round ...", file=sys.stderr)
    first = edgert.run()
    in_process = library.verify()
    reference = high_level.verify()
    high_level.run()
    same_settings = tuned.verify()
    tuned.run()
    prompt_tokens = first.prompt_tokens or 0
    runners: list[Any] = [edgert, library, high_level, tuned]
    binary = find_llama_tool("llama-bench", args.llama_bench)
    if binary:
        runners.append(LlamaBenchRunner(binary, model, args, n_batch, depth=prompt_tokens))

    checks = []
    counts = (f"edgert {first.gen_tokens}, create_completion {reference.gen_tokens}, "
              f"tuned {same_settings.gen_tokens}")
    if first.gen_tokens == reference.gen_tokens == same_settings.gen_tokens == args.tokens:
        checks.append(f"generated tokens: both {args.tokens} (as asked)")
    else:
        checks.append(f"WARNING generated tokens differ from --tokens {args.tokens}: {counts} "
                      "(the prompt hit end-of-text early; choose another --prompt)")
    # Flash attention changes the arithmetic, so only the tuned create_completion must match.
    same_text = first.text == same_settings.text == in_process.text
    checks.append(f"greedy text of edgert run, edgert generate and create_completion (tuned, same "
                  f"settings) identical: {'yes' if same_text else 'NO'}")
    if reference.prompt_tokens != first.prompt_tokens:
        checks.append(f"WARNING prompt tokens differ: edgert {first.prompt_tokens}, "
                      f"create_completion {reference.prompt_tokens}")

    samples: dict[str, list[Sample]] = {r.name: [] for r in runners}
    for rep in range(args.reps):
        for runner in runners:
            print(f"round {rep + 1}/{args.reps}: {runner.name}", file=sys.stderr)
            samples[runner.name].append(runner.run())
    for worker in (library, high_level, tuned):
        worker.close()
    if binary:
        checks.append(f"native: {binary} (tg at depth {prompt_tokens}, -fa 1, -t {args.threads})")

    print_report(args, model, prompt_tokens, n_batch, samples, checks, (load_before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
