#!/usr/bin/env python3
"""SIGKILL at random moments while edgert writes: a conversion, a store add, a chat's /save.

After every kill: no partial file is visible (a file under an artifact's, a manifest's or a
conversation's name is whole; temporary names are hidden and never end in the artifact's
extension), every manifest parses and matches its files, and a rerun completes (after every
``--rerun-every`` kills; the killed runs in between each resume what the kill before left).

- convert: ``edgert convert SRC --quant Q8_0 --no-eval --no-store --out DIR``, SRC a tiny random
  Llama (numpy weights, the tests' tiny tokenizer) made once under ``--workdir``;
- add: ``edgert models add GGUF --name kill-test --copy`` into a store of its own (the embedded
  SmolLM2, so copying and hashing take a while);
- save: ``edgert chat`` loads a large conversation and saves it again and again.

The kill goes to the edgert process alone, as ``kill -9`` or the OOM killer would send it; children
it leaves running (the quantizer's worker) are counted and waited for before the checks. Prints,
per kind, the kills, where they left things, the problems (each listed), orphaned children and
leftover temporaries. Always exits 0; tests/test_kills.py runs it at CI size and asserts.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from executables import REPO_ROOT, find_edgert

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.files import parse_json, read_regular_file
from edge_runtime.formats.gguf import read_gguf_header
from edge_runtime.models.manifest import read_manifest, verify_manifest
from edge_runtime.models.spec import resolve_model
from edge_runtime.sample_text import python_docs_text
from edge_runtime.session import CONVERSATION_MAX_BYTES, parse_conversation

RUN_TIMEOUT_S = 600
STDERR_LOG = "stderr.log"  # in the work folder, never in a folder a check looks at


@dataclass
class Tally:
    """What the kills of one kind did."""

    kind: str
    kills: int = 0
    finished_first: int = 0
    reruns: int = 0
    orphans: int = 0
    leftovers: int = 0
    states: collections.Counter = field(default_factory=collections.Counter)
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        """The printout for this kind."""
        states = ", ".join(f"{name} {count}" for name, count in sorted(self.states.items()) if count)
        return (f"{self.kind:<8} {self.kills} kills ({self.finished_first} runs finished before their kill) · "
                f"{len(self.problems)} problems · {self.reruns} reruns completed · {self.orphans} orphaned "
                f"children waited for · {self.leftovers} leftover temporaries · left behind: {states or '-'}")


@dataclass
class Setup:
    """What every kind needs: the edgert to run, a work folder, a random source, the environment."""

    edgert: str
    work: Path
    rng: random.Random
    rerun_every: int
    env: dict[str, str]
    log: Callable[[str], None]


def start(cmd: list[str], setup: Setup, *, cwd: Path | None = None, stdin: str | None = None) -> subprocess.Popen:
    """``cmd`` in a session of its own (its children share its process group), stderr to a file;
    ``stdin`` is a few kilobytes at most, so it fits the pipe and writing it never waits."""
    with open(setup.work / STDERR_LOG, "wb") as err:
        proc = subprocess.Popen(cmd, env=setup.env, cwd=cwd, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, text=True, start_new_session=True)
    if stdin and proc.stdin is not None:
        proc.stdin.write(stdin)
        proc.stdin.close()
    return proc


def stderr_text(setup: Setup) -> str:
    """What the last process started wrote to stderr so far."""
    return (setup.work / STDERR_LOG).read_text(encoding="utf-8", errors="replace")


def wait_for_line(proc: subprocess.Popen, setup: Setup, marker: str) -> None:
    """Until ``marker`` appears on ``proc``'s stderr, or it ends."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while proc.poll() is None and marker not in stderr_text(setup) and time.monotonic() < deadline:
        time.sleep(0.01)


def run_to_end(cmd: list[str], setup: Setup, *, cwd: Path | None = None,
               stdin: str | None = None) -> tuple[int, str, float]:
    """(exit status, stderr, seconds) of ``cmd`` run to its end."""
    started = time.perf_counter()
    proc = start(cmd, setup, cwd=cwd, stdin=stdin)
    proc.wait(timeout=RUN_TIMEOUT_S)
    return proc.returncode, stderr_text(setup), time.perf_counter() - started


def first_run(cmd: list[str], setup: Setup, tally: Tally, what: str) -> float | None:
    """Seconds a whole run of ``cmd`` takes (the kills land within it); None, and a problem, if it fails."""
    code, err, seconds = run_to_end(cmd, setup)
    if code != 0:
        tally.problems.append(f"the first {what} failed: {err[-500:]}")
        return None
    setup.log(f"{tally.kind}: a whole {what} takes {seconds:.1f} s")
    return seconds


def killed_run(cmd: list[str], setup: Setup, tally: Tally, delay: float, check: Callable[[], str], *,
               cwd: Path | None = None, stdin: str | None = None, marker: str | None = None) -> bool:
    """Run ``cmd`` and SIGKILL it ``delay`` s in (counted from ``marker`` on its stderr, if given);
    wait for what it left running, then tally what ``check`` finds. False when it ended first."""
    proc = start(cmd, setup, cwd=cwd, stdin=stdin)
    if marker:
        wait_for_line(proc, setup, marker)
    try:
        proc.wait(timeout=max(delay, 0.0))
        killed = False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)  # the edgert process alone, as the OOM killer would
        proc.wait()
        killed = True
    wait_for_orphans(proc.pid, tally)
    tally.states[check()] += int(killed)
    return killed


def group_members(pgid: int) -> list[int]:
    """Processes still in process group ``pgid`` (children the killed process left behind)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2:].split()[2]) == pgid:  # after the name: state, ppid, pgrp
            found.append(int(entry.name))
    return found


def wait_for_orphans(pgid: int, tally: Tally, timeout: float = 120.0) -> None:
    """Count the children a kill left running and wait for them to end (kill them after ``timeout``)."""
    tally.orphans += len(group_members(pgid))
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in group_members(pgid):
        tally.problems.append(f"child {pid} of a killed run still running after {timeout:.0f} s; killed")
        os.kill(pid, signal.SIGKILL)


def hidden_leftovers(folder: Path, extensions: tuple[str, ...], tally: Tally) -> None:
    """Temporary names must be hidden and never end like what they become; count them, then remove them."""
    for p in folder.iterdir():
        if not p.name.startswith(".") or p.name in (".edgert-build.lock", ".lock"):
            continue
        if p.name.endswith(extensions):
            tally.problems.append(f"{p}: a temporary name ending like the file it becomes")
        tally.leftovers += 1
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def check_manifest_folder(folder: Path, tally: Tally, what: str) -> bool:
    """The manifest in ``folder`` parses and every artifact it lists matches it; True if so."""
    try:
        manifest = read_manifest(folder)
    except EdgeRuntimeError as exc:
        tally.problems.append(f"{what}: manifest unreadable: {exc.message}")
        return False
    bad = [f"{c.file} ({c.status})" for c in verify_manifest(manifest) if not c.ok]
    if bad:
        tally.problems.append(f"{what}: artifacts that do not match the manifest: {', '.join(bad)}")
    return not bad


def check_convert_output(out: Path, tally: Tally) -> str:
    """No partial artifact, a manifest that parses; returns what the folder holds (for the tally)."""
    if not out.is_dir():
        return "nothing"
    hidden_leftovers(out, (".gguf", ".json"), tally)
    held = []
    for p in sorted(out.iterdir()):
        if p.name.startswith("."):
            continue
        if p.suffix == ".gguf":
            held.append(p.stem.rsplit("-", 1)[-1])
            try:
                read_gguf_header(p)
            except EdgeRuntimeError as exc:
                tally.problems.append(f"partial artifact {p.name}: {exc.message}")
        elif p.name == "manifest.json":
            held.append("manifest")
            check_manifest_folder(out, tally, "convert output")
        else:
            tally.problems.append(f"{p}: an unexpected file in the output")
    return "+".join(held) or "nothing"


def tiny_source(work: Path) -> Path:
    """A tiny random Llama HF folder (numpy weights, the tests' tiny tokenizer), made once."""
    folder = work / "tiny-llama"
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from tiny_models import save_tokenizer, train_tokenizer, write_random_llama

    tok = train_tokenizer()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=work))
    write_random_llama(staging, tok.get_vocab_size(with_added_tokens=True), lambda d: save_tokenizer(tok, d), layers=2)
    os.replace(staging, folder)
    return folder


def kill_loop(n: int, tally: Tally, setup: Setup, *, reset: Callable[[], None], kill_one: Callable[[], bool],
              rerun: Callable[[], None]) -> None:
    """``n`` kills: each run resumes what the last left, until a run completes; then ``reset``."""
    complete, since_rerun, attempts = True, 0, 0
    while tally.kills < n and attempts < 3 * n:
        attempts += 1
        if complete:
            reset()
        killed = kill_one()
        complete = not killed
        if killed:
            tally.kills, since_rerun = tally.kills + 1, since_rerun + 1
        else:
            tally.finished_first += 1
        if killed and (since_rerun >= setup.rerun_every or tally.kills == n):
            rerun()
            since_rerun, complete = 0, True


def convert_kind(n: int, setup: Setup, source: Path | None = None) -> Tally:
    """Kill conversions of a tiny model to Q8_0."""
    tally = Tally("convert")
    source = source or tiny_source(setup.work)
    out = setup.work / "convert-out"
    cmd = [setup.edgert, "convert", str(source), "--quant", "Q8_0", "--no-eval", "--no-store", "--out", str(out)]
    shutil.rmtree(out, ignore_errors=True)
    seconds = first_run(cmd, setup, tally, "conversion")
    if seconds is None:
        return tally

    def rerun() -> None:
        code, err, _ = run_to_end(cmd, setup)
        state = check_convert_output(out, tally)
        if code != 0 or "manifest" not in state or not check_manifest_folder(out, tally, "rerun"):
            tally.problems.append(f"a rerun did not complete (exit {code}; {state}): {err[-300:]}")
        else:
            tally.reruns += 1

    kill_loop(n, tally, setup, reset=lambda: shutil.rmtree(out, ignore_errors=True), rerun=rerun,
              kill_one=lambda: killed_run(cmd, setup, tally, setup.rng.uniform(0, seconds),
                                          lambda: check_convert_output(out, tally)))
    return tally


def add_kind(n: int, setup: Setup, gguf: Path | None = None) -> Tally:
    """Kill ``edgert models add`` copying and hashing a model into the store."""
    tally = Tally("add")
    gguf = gguf or resolve_model("smollm2")
    root = Path(setup.env["EDGERT_HOME"]) / "models"
    cmd = [setup.edgert, "models", "add", str(gguf), "--name", "kill-test", "--copy"]
    seconds = first_run(cmd, setup, tally, "add")
    if seconds is None:
        return tally

    def check_store() -> str:
        entries = [p for p in root.iterdir() if not p.name.startswith(".")]
        for entry in entries:
            check_manifest_folder(entry, tally, f"store entry {entry.name}")
        return "entry" if entries else "no entry (between the two renames of a replace)"

    def rerun() -> None:
        code, err, _ = run_to_end(cmd, setup)
        listed, listing, _ = run_to_end([setup.edgert, "models", "list", "--json"], setup)
        if code != 0 or check_store() != "entry" or listed != 0 or "damaged" in listing:
            tally.problems.append(f"a rerun did not complete (exit {code}, list exit {listed}): {err[-300:]}")
        else:
            tally.reruns += 1
        hidden_leftovers(root, (".gguf", ".json"), tally)

    kill_loop(n, tally, setup, reset=lambda: None, rerun=rerun,
              kill_one=lambda: killed_run(cmd, setup, tally, setup.rng.uniform(0, seconds), check_store))
    return tally


def save_kind(n: int, setup: Setup, model: str = "smollm2", n_messages: int = 400) -> Tally:
    """Kill ``edgert chat --model MODEL`` while it saves a large conversation again and again."""
    tally = Tally("save")
    folder = setup.work / "save"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    text = python_docs_text(n_messages * 10_000)
    size = max(len(text) // n_messages, 1)
    messages = [{"role": ("user", "assistant")[i % 2], "content": text[i * size:(i + 1) * size]}
                for i in range(n_messages)]
    conversation = {"version": 1, "system": "Kill tests.", "messages": messages}
    (folder / "big.json").write_text(json.dumps(conversation), encoding="utf-8")
    cmd = [setup.edgert, "chat", "--model", model, "--threads", "1"]
    script = "/load big.json\n" + "/save out.json\n" * 200
    started = time.perf_counter()
    proc = start(cmd, setup, cwd=folder, stdin=script)
    wait_for_line(proc, setup, "saved to")
    first_save = time.perf_counter() - started
    proc.wait(timeout=RUN_TIMEOUT_S)
    saving = time.perf_counter() - started - first_save
    err = stderr_text(setup)
    saves = err.count("saved to")
    if proc.returncode != 0 or saves != 200:
        tally.problems.append(f"the first chat failed (exit {proc.returncode}, {saves} saves): {err[-500:]}")
        return tally
    setup.log(f"save: {len(json.dumps(conversation)) / 1e6:.1f} MB conversation, {saving / saves * 1000:.0f} ms a save")

    def check_folder() -> str:
        hidden_leftovers(folder, (".json",), tally)
        visible = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        if visible not in (["big.json"], ["big.json", "out.json"]):
            tally.problems.append(f"unexpected files after a kill: {visible}")
        if "out.json" not in visible:
            return "no save yet"
        try:
            data = parse_json(read_regular_file(folder / "out.json", CONVERSATION_MAX_BYTES), "out.json")
            system, saved = parse_conversation(data, "out.json")
        except EdgeRuntimeError as exc:
            tally.problems.append(f"partial conversation: {exc.message}")
            return "partial save"
        if system != conversation["system"] or saved != messages:
            tally.problems.append("a saved conversation differs from the one loaded")
        return "whole save"

    def rerun() -> None:
        code, err, _ = run_to_end(cmd, setup, cwd=folder, stdin="/load out.json\n/save out.json\n")
        if code != 0 or "saved to" not in err or check_folder() != "whole save":
            tally.problems.append(f"a rerun did not complete (exit {code}): {err[-300:]}")
        else:
            tally.reruns += 1

    # Each kill lands after the first save: the model is loaded and the saving has begun.
    kill_loop(n, tally, setup, reset=lambda: None, rerun=rerun,
              kill_one=lambda: killed_run(cmd, setup, tally, setup.rng.uniform(0, saving / 2), check_folder,
                                          cwd=folder, stdin=script, marker="saved to"))
    return tally


RUNNERS = {"convert": convert_kind, "add": add_kind, "save": save_kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50, help="SIGKILLs per kind (default 50)")
    parser.add_argument("--kinds", default=",".join(RUNNERS), help="comma-separated: convert,add,save")
    parser.add_argument("--rerun-every", type=int, default=1, help="kills between reruns to completion (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for the kill moments")
    parser.add_argument("--workdir", default=None, help="folder to work in (default: a temporary one)")
    parser.add_argument("--edgert", default=None, help="the edgert to run (default: the venv's)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="edgert-kills-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    setup = Setup(edgert=find_edgert(args.edgert), work=work, rng=random.Random(seed),
                  rerun_every=max(args.rerun_every, 1), env={**os.environ, "EDGERT_HOME": str(work / "home")},
                  log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"kills: {args.kills} per kind · seed {seed} · rerun every {setup.rerun_every} · load average "
          f"{os.getloadavg()[0]:.1f} · work in {work}")
    for kind in args.kinds.split(","):
        tally = RUNNERS[kind.strip()](args.kills, setup)
        print(tally.line(), flush=True)
        for problem in tally.problems:
            print(f"  problem: {problem}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
