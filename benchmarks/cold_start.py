#!/usr/bin/env python3
"""Cold start of `edgert run`: process start to the first streamed token on stdout.

Spawns ``edgert run PROMPT --max-tokens 8`` (greedy) and times from just before the spawn to the
first byte the process writes on its stdout, ``--reps`` times (after one untimed run, so the OS
file cache holds the model and the interpreter's files, as on any second run), and prints the
median. For context it also times a bare ``python -c pass`` and ``edgert --help``, and lists the
slowest imports (``python -X importtime``) of ``import edge_runtime.cli`` (what ``--help`` pays)
and of the modules ``edgert run`` loads before its first token.

Target: first token in under 1.5 s for the embedded model (heavy libraries imported lazily).
The script reports; it never fails on a missed target.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from executables import find_edgert

TARGET_S = 1.5
RUN_PATH_IMPORTS = (
    "import edge_runtime.cli, edge_runtime.cli.chat_loop, edge_runtime.session, edge_runtime.models.store, "
    "edge_runtime.backends.llamacpp.model"
)


@dataclass(frozen=True)
class ColdRun:
    """One timed ``edgert run``."""

    first_byte_s: float
    exit_s: float


@dataclass(frozen=True)
class ImportLine:
    """One line of ``-X importtime`` output."""

    self_us: int
    cumulative_us: int
    module: str  # with its nesting indentation stripped
    depth: int


def time_first_byte(command: list[str]) -> ColdRun:
    """Spawn ``command``; seconds to its first stdout byte and to its exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = os.read(proc.stdout.fileno(), 1)
    first_at = time.perf_counter()
    _out, err = proc.communicate()
    exit_at = time.perf_counter()
    if proc.returncode != 0 or not first:
        raise RuntimeError(f"{' '.join(command)} exited {proc.returncode}:\n{err.decode(errors='replace')[-2000:]}")
    return ColdRun(first_at - start, exit_at - start)


def time_command(command: list[str]) -> float:
    """Seconds from spawn to exit of ``command`` (output discarded)."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def import_times(statement: str) -> list[ImportLine]:
    """``python -X importtime -c STATEMENT``, parsed."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", statement],
                          capture_output=True, text=True, check=True)
    lines = []
    for raw in proc.stderr.splitlines():
        if not raw.startswith("import time:") or "self [us]" in raw:
            continue
        self_us, cumulative_us, name = raw[len("import time:"):].split("|", 2)
        stripped = name.lstrip()
        depth = (len(name) - len(stripped) - 1) // 2
        lines.append(ImportLine(int(self_us), int(cumulative_us), stripped, depth))
    return lines


def print_imports(title: str, lines: list[ImportLine], top: int) -> None:
    """Total, then the slowest packages by cumulative time (top level first) and by own time."""
    total = sum(line.cumulative_us for line in lines if line.depth == 0) / 1000
    print(f"{title}: {total:.1f} ms in total")
    print(f"  {'cumulative ms':>13}  {'self ms':>8}  module")
    by_cumulative = sorted((x for x in lines if x.depth <= 1), key=lambda x: -x.cumulative_us)
    for line in by_cumulative[:top]:
        indent = "  " * line.depth
        print(f"  {line.cumulative_us / 1000:>13.1f}  {line.self_us / 1000:>8.1f}  {indent}{line.module}")
    heaviest_self = sorted(lines, key=lambda x: -x.self_us)[:5]
    print("  largest own times: " + ", ".join(f"{x.module} {x.self_us / 1000:.1f} ms" for x in heaviest_self))


def median_of(values: list[float]) -> float:
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or store name (default: embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: edgert's own choice)")
    parser.add_argument("--reps", type=int, default=7, help="timed runs (default 7)")
    parser.add_argument("--prompt", default="The capital of France is", help="raw prompt")
    parser.add_argument("--top", type=int, default=10, help="import lines to list (default 10)")
    args = parser.parse_args()

    edgert = find_edgert()
    command = [edgert, "run", args.prompt, "--max-tokens", "8", "--temp", "0"]
    if args.model:
        command += ["--model", args.model]
    if args.threads:
        command += ["--threads", str(args.threads)]
    load_before = os.getloadavg()[0]

    print("warm-up run ...", file=sys.stderr)
    time_first_byte(command)
    time_command([edgert, "--help"])
    runs, helps, bare = [], [], []
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)
        runs.append(time_first_byte(command))
        helps.append(time_command([edgert, "--help"]))
        bare.append(time_command([sys.executable, "-c", "pass"]))
    load_after = os.getloadavg()[0]

    first = [r.first_byte_s for r in runs]
    med = median_of(first)
    print(f"cold start · {' '.join(command[1:3])!s} ... · median of {args.reps} after a warm-up run · "
          f"load average {load_before:.2f} before, {load_after:.2f} after")
    print()
    print(f"{'measure':<44}{'median s':>10}{'min':>8}{'max':>8}")
    rows = [
        ("python -c pass (interpreter start)", bare),
        ("edgert --help (start to exit)", helps),
        ("edgert run: start to first stdout byte", first),
        ("edgert run: start to exit (8 tokens)", [r.exit_s for r in runs]),
    ]
    for label, values in rows:
        print(f"{label:<44}{median_of(values):>10.3f}{min(values):>8.3f}{max(values):>8.3f}")
    print()
    verdict = "meets target" if med < TARGET_S else "ABOVE target"
    print(f"first token / target {TARGET_S} s            {med / TARGET_S:6.2f}   ({verdict})")
    print(f"first token / edgert --help            {med / median_of(helps):6.2f}")
    print()
    print_imports("import edge_runtime.cli (what --help pays)", import_times("import edge_runtime.cli"), args.top)
    print()
    print_imports("modules edgert run imports before its first token", import_times(RUN_PATH_IMPORTS), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
