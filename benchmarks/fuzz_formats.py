#!/usr/bin/env python3
"""Hostile model files through the public API: how many crash, hang, raise a traceback, or make
a runtime read a file outside the model's folder.

Seeds: a tiny random Llama (``tests/tiny_models.py``) converted by our converters to GGUF (f32),
TFLite (f32, KV 128) and ONNX (fp32), cached under ``--seeds``. Each format gets ``-n`` mutants
(``fuzz_mutations.py``: bit flips, splices, truncations, and edits of the fields each reader must
check), each in a folder of its own, loaded in a long-lived worker with ``edge_runtime.load(path)``
and a two-token greedy generation; the worker is replaced when it dies or hangs. Outcomes: ok /
error (loaded, or refused with an ``EdgeRuntimeError``: both fine); crash (the worker died);
hang (no answer within 10 s); flaky (crashed or hung, but not alone in a fresh worker: reported,
not counted as the file's); traceback (any other exception); outside (a file outside the mutant's
folder was opened). The ONNX mutants point their paths (``..``, absolute paths, links) at bait
copies of the seed's files in ``<work>/outside`` and at ``/etc/hostname``; Python-level opens are
seen by an audit hook in the worker, native ones (llama.cpp, onnxruntime, LiteRT) by ``strace -f
-y`` on the worker for every mutant when strace is installed (without it, the printout says
native reads were not covered).

The worker runs with ``EDGERT_TRIAL_LOAD=0`` unless ``--probe``: the figures are those of our
format checks and the native runtimes, each crash a file that got past the checks. Findings are
copied to ``--out`` with a note on how to reproduce them. Target: 0 / 0 / 0 / 0 per format; the
script reports and always exits 0.

    .venv/bin/python benchmarks/fuzz_formats.py            # -n 10000 --formats gguf,tflite,onnx
    .venv/bin/python benchmarks/fuzz_formats.py -n 1000 --seed 7 --out build/fuzz-findings
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fuzz_mutations as mut

REPO = Path(__file__).resolve().parent.parent
HANG_S = 10.0
START_S = 300.0  # a worker's start: imports and the seed's warm-up load
FORMATS = ("gguf", "tflite", "onnx")
OUTCOMES = ("ok", "error", "crash", "hang", "traceback", "outside", "flaky")
BAD = ("crash", "hang", "traceback", "outside")
MARK = "/nonexistent-edgert-fuzz-mark/"
_OPENED = re.compile(r"open(?:at2?)?(?:\(| resumed>).*= \d+<(.+)>$")  # strace -y: the file a new fd is
WATCHED_ABSOLUTE = ("/etc/hostname",)  # the absolute bait outside the work folder


@dataclass
class Report:
    """Counts per (format, kind, outcome) and the findings kept for reproduction."""

    counts: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    findings: list[str] = field(default_factory=list)
    native_reads_covered: bool = False

    def bad(self, fmt: str) -> int:
        return sum(n for (f, _, outcome), n in self.counts.items() if f == fmt and outcome in BAD)


def build_seeds(cache: Path, formats: tuple[str, ...]) -> dict[str, Path]:
    """The seed artifacts, converted once from a tiny random Llama and kept under ``cache``."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import build_tiny_llama, train_tokenizer

    digest = hashlib.sha256()
    for source in sorted((REPO / "converters").glob("*.py")) + [REPO / "tests" / "tiny_models.py"]:
        digest.update(source.read_bytes())
    root = cache / digest.hexdigest()[:12]
    hf = root / "hf" / "f32"
    if not (hf / "config.json").is_file():
        build_tiny_llama(root / "hf", train_tokenizer())
    seeds = {}
    if "gguf" in formats:
        from edge_runtime.converters.hf_to_gguf import convert_hf_to_gguf

        seeds["gguf"] = root / "tiny-f32.gguf"
        if not seeds["gguf"].is_file():
            convert_hf_to_gguf(hf, seeds["gguf"], outtype="f32")
    if "tflite" in formats:
        from edge_runtime.converters.to_tflite import convert_hf_to_tflite, tflite_file_name

        seeds["tflite"] = root / "tflite" / tflite_file_name("tiny", "none")
        if not seeds["tflite"].is_file():
            convert_hf_to_tflite(hf, seeds["tflite"], quantize="none", prefill_lengths=(8, 32), kv_cache_max_len=128)
    if "onnx" in formats:
        from edge_runtime.converters.to_onnx import convert_hf_to_onnx, onnx_folder_name

        seeds["onnx"] = root / "onnx" / onnx_folder_name("tiny", "fp32")
        if not (seeds["onnx"] / "genai_config.json").is_file():
            convert_hf_to_onnx(hf, seeds["onnx"], precision="fp32")
    return seeds


def worker(reply_fd: int, warm_up: str) -> None:
    """Load each path sent on stdin (one JSON line each) and answer on ``reply_fd``."""
    root = os.path.realpath(os.environ["EDGERT_FUZZ_ROOT"])
    current: dict[str, Any] = {"folder": None, "outside": []}

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if event == "open" and current["folder"] and isinstance(args[0], str | bytes):
            real = os.path.realpath(os.fsdecode(args[0]))
            if escapes(real, root, current["folder"]):
                current["outside"].append(real)

    replies = os.fdopen(reply_fd, "w", buffering=1)
    load_and_generate(warm_up)  # imports the runtimes before any mutant is watched
    sys.addaudithook(audit)
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        _mark(f"start-{job['id']}")
        current.update(folder=os.path.realpath(job["folder"]), outside=[])
        reply = load_and_generate(job["path"])
        reply.update(id=job["id"], outside=current["outside"][:3])
        current["folder"] = None
        _mark(f"end-{job['id']}")
        replies.write(json.dumps(reply) + "\n")


def load_and_generate(path: str) -> dict[str, Any]:
    """``edge_runtime.load(path)`` and two greedy tokens; what happened, as a dict."""
    import traceback

    import edge_runtime
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.errors import EdgeRuntimeError

    try:
        with edge_runtime.load(path) as model:
            tokens = model.tokenize("Hello world", add_bos=True)[:8] or [0]
            n = sum(1 for _ in model.generate(tokens, SamplingParams(max_tokens=2, temperature=0.0)))
        return {"outcome": "ok", "detail": f"{n} tokens"}
    except EdgeRuntimeError as exc:
        return {"outcome": "error", "detail": f"{type(exc).__name__}: {exc.message}"}
    except Exception:
        return {"outcome": "traceback", "detail": traceback.format_exc()}


def _mark(what: str) -> None:
    """An open that fails, so that strace's log says where each mutant's opens begin and end."""
    with contextlib.suppress(OSError):
        os.close(os.open(MARK + what, os.O_RDONLY))


def escapes(real: str, root: str, folder: str) -> bool:
    """Whether an opened file (links followed) is bait: in the work folder but outside the mutant's."""
    if real in WATCHED_ABSOLUTE:
        return True
    inside = lambda path, top: path == top or path.startswith(top.rstrip("/") + "/")
    return inside(real, root) and not inside(real, folder)


class Worker:
    """A worker process, started again whenever it died or hung."""

    def __init__(self, root: Path, warm_up: Path, probe: bool, strace: str | None) -> None:
        self.root, self.warm_up, self.probe, self.strace = root, warm_up, probe, strace
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: Path | None = None
        self.log_at = self.incarnations = 0
        self.stderr_path = root / "worker-stderr.txt"

    def start(self) -> None:
        read_fd, write_fd = os.pipe()
        command = [sys.executable, __file__, "--worker", str(write_fd), str(self.warm_up)]
        self.incarnations += 1
        # The runtime's own caches (XNNPACK's) go under EDGERT_HOME: not bait, so not under root.
        self.home = Path(tempfile.mkdtemp(prefix="edgert-fuzz-home-"))
        if self.strace:
            self.log, self.log_at = self.root / f"strace-{self.incarnations}.log", 0
            command = [self.strace, "-f", "-y", "-qq", "-s", "4096", "--seccomp-bpf", "-e",
                       "trace=open,openat,openat2", "-o", str(self.log), *command]
        env = {**os.environ, "EDGERT_FUZZ_ROOT": str(self.root), "EDGERT_HOME": str(self.home),
               "EDGERT_TRIAL_LOAD": "1" if self.probe else "0", "PYTHONPATH": str(Path(__file__).parent)}
        self.stderr = self.stderr_path.open("ab")
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     pass_fds=(write_fd,), start_new_session=True, env=env)
        os.close(write_fd)
        self.replies, self.buffer = read_fd, b""
        if self.read(START_S) in ("hang", "died"):
            raise SystemExit(f"the fuzz worker did not start; see {self.stderr_path}")

    def read(self, timeout: float) -> dict[str, Any] | str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                return "hang"
            chunk = os.read(self.replies, 65536)
            if not chunk:
                return "died"
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)

    def ask(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.proc is None:
            self.start()
        assert self.proc is not None and self.proc.stdin is not None
        err_at = self.stderr_path.stat().st_size
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        reply = self.read(HANG_S)
        if isinstance(reply, dict):
            return reply
        if reply == "hang":
            os.killpg(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        self.stop()
        with self.stderr_path.open("rb") as fh:
            fh.seek(err_at)
            tail = fh.read().decode("utf-8", errors="replace")[-3000:]
        if reply == "hang":
            return {"outcome": "hang", "detail": f"no answer within {HANG_S:.0f} s\n{tail}"}
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code} without an answer"
        return {"outcome": "crash", "detail": f"{how}\n{tail}"}

    def native_opens(self, job_id: int) -> list[str]:
        """Files the worker opened for job ``job_id``, from strace's log (links followed)."""
        if self.log is None:
            return []
        end, raw = f"{MARK}end-{job_id}".encode(), b""
        deadline = time.monotonic() + 5.0  # strace writes each line as it goes; wait for the mark
        while time.monotonic() < deadline:
            with self.log.open("rb") as fh:
                fh.seek(self.log_at)
                raw = fh.read()
            if end in raw or self.proc is None:
                break
            time.sleep(0.02)
        cut = raw.find(end)
        cut = len(raw) if cut < 0 else raw.find(b"\n", cut) + 1
        self.log_at += cut
        lines = raw[:cut].decode("utf-8", errors="replace").splitlines()
        return [m.group(1) for line in lines if (m := _OPENED.search(line))]

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
            os.close(self.replies)
            self.stderr.close()
            shutil.rmtree(self.home, ignore_errors=True)
            self.proc = None


def fuzz(seeds: dict[str, Path], n: int, seed: int, out: Path, *, probe: bool = False, use_strace: bool = True,
         progress: Callable[[str], None] | None = None) -> Report:
    """Run ``n`` mutants of each seed through the public API; the counts and the findings."""
    report = Report()
    strace = shutil.which("strace") if use_strace else None
    report.native_reads_covered = strace is not None
    for fmt, seed_path in seeds.items():
        root = Path(tempfile.mkdtemp(prefix=f"edgert-fuzz-{fmt}-"))
        try:
            _fuzz_one(fmt, seed_path, n, random.Random(f"{seed}-{fmt}"), root, out, probe, strace, report, progress)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return report


def _fuzz_one(fmt: str, seed_path: Path, n: int, rng: random.Random, root: Path, out: Path, probe: bool,
              strace: str | None, report: Report, progress: Callable[[str], None] | None) -> None:
    outside = root / "outside"  # bait: what a path leading out of a mutant's folder would find
    if seed_path.is_dir():
        shutil.copytree(seed_path, outside)
    else:
        outside.mkdir()
        shutil.copyfile(seed_path, outside / seed_path.name)
    hot: list[int] = []
    if fmt == "gguf":
        seed_bytes = seed_path.read_bytes()
        fields = mut.gguf_fields(seed_bytes)
        make = lambda kind, folder: mut.mutate_gguf(rng, seed_bytes, fields, hot, kind, folder)
        kinds = mut.GGUF_KINDS
    elif fmt == "tflite":
        fields = mut.tflite_fields(seed_path.read_bytes())
        make = lambda kind, folder: mut.mutate_tflite(rng, seed_path, fields, hot, kind, folder)
        kinds = mut.TFLITE_KINDS
    else:
        fields = {}
        make = lambda kind, folder: mut.mutate_onnx(rng, seed_path, outside, kind, folder)
        kinds = mut.ONNX_KINDS
    hot += mut.hot_positions(fields)
    worker_ = Worker(root, seed_path, probe, strace)
    real_root = os.path.realpath(root)
    try:
        for i in range(n):
            kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
            folder = root / "mutants" / f"m{i}"
            folder.mkdir(parents=True)
            path = make(kind, folder)
            job = {"id": i, "path": str(path), "folder": str(folder)}
            reply = worker_.ask(job)
            opened = worker_.native_opens(i)
            if reply["outcome"] in ("crash", "hang"):  # again, alone in a fresh worker: is it the file?
                again = worker_.ask(job)
                opened += worker_.native_opens(i)
                if again["outcome"] not in ("crash", "hang"):
                    reply.update(outcome="flaky", detail=f"{reply['detail']}\nalone in a fresh worker: "
                                                         f"{again['outcome']}: {again.get('detail')}")
            real_folder = os.path.realpath(folder)
            native = [f for f in opened if escapes(f, real_root, real_folder)]
            reply["outside"] = reply.get("outside", []) + native[:3]
            outcome = "outside" if reply["outside"] and reply["outcome"] in ("ok", "error") else reply["outcome"]
            report.counts[(fmt, kind, outcome)] += 1
            if outcome in (*BAD, "flaky"):
                _keep(out, fmt, kind, outcome, i, folder, path, reply, report)
            mut.clear(folder)
            if progress and (i + 1) % 100 == 0:
                progress(f"{fmt}: {i + 1}/{n}, {report.bad(fmt)} bad")
    finally:
        worker_.stop()


def _keep(out: Path, fmt: str, kind: str, outcome: str, i: int, folder: Path, path: Path, reply: dict[str, Any],
          report: Report) -> None:
    """Copy a finding's files to ``out`` with a note on how to load it again."""
    target = out / fmt / f"{outcome}-{kind}-{i}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(folder, target, symlinks=True)
    shown = target / path.relative_to(folder)
    note = (f"{outcome} ({kind} mutant #{i} of {fmt})\nreproduce: EDGERT_TRIAL_LOAD=0 python -c "
            f"\"import edge_runtime; edge_runtime.load('{shown}')\"\n\n{reply.get('detail', '')}\n"
            f"outside: {reply.get('outside')}\n")
    (target / "FINDING.txt").write_text(note)
    first = (reply.get("detail") or "").strip().splitlines()[:1]
    report.findings.append(f"{fmt} #{i} {kind}: {outcome}: {first[0] if first else ''} -> {target}")


def print_report(report: Report, formats: tuple[str, ...], n: int, seconds: float) -> None:
    print(f"{'format':7} {'kind':14} " + " ".join(f"{o:>9}" for o in OUTCOMES))
    for fmt in formats:
        kinds = sorted({k for f, k, _ in report.counts if f == fmt})
        for kind in [*kinds, "total"]:
            row = [sum(c for (f, k, o), c in report.counts.items()
                       if f == fmt and o == outcome and kind in (k, "total")) for outcome in OUTCOMES]
            print(f"{fmt:7} {kind:14} " + " ".join(f"{c:>9}" for c in row))
    print(f"\n{n} mutants per format in {seconds:.0f} s; crashes / hangs / tracebacks / outside reads:")
    for fmt in formats:
        got = [sum(c for (f, _, o), c in report.counts.items() if f == fmt and o == outcome) for outcome in BAD]
        flaky = sum(c for (f, _, o), c in report.counts.items() if f == fmt and o == "flaky")
        print(f"  {fmt}: {' / '.join(map(str, got))}  (target 0 / 0 / 0 / 0; flaky: {flaky})")
    covered = "Python (audit hook) and native (strace -f -y)" if report.native_reads_covered else \
        "Python only (audit hook); install strace to cover native reads"
    print(f"reads outside the folder watched: {covered}")
    for finding in report.findings[:40]:
        print("  " + finding)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="mutants per format")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--seeds", type=Path, default=REPO / "build" / "fuzz-seeds", help="seed cache folder")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "fuzz-findings")
    parser.add_argument("--probe", action="store_true", help="keep the trial load (EDGERT_TRIAL_LOAD) on")
    parser.add_argument("--no-strace", action="store_true")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(int(args.worker[0]), args.worker[1])
        return
    formats = tuple(f for f in args.formats.split(",") if f)
    print(f"load average {os.getloadavg()[0]:.2f}; seeds in {args.seeds}", file=sys.stderr)
    seeds = build_seeds(args.seeds, formats)
    start = time.perf_counter()
    report = fuzz(seeds, args.n, args.seed, args.out, probe=args.probe, use_strace=not args.no_strace,
                  progress=lambda line: print(line, file=sys.stderr, flush=True))
    print_report(report, formats, args.n, time.perf_counter() - start)


if __name__ == "__main__":
    main()
