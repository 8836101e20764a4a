"""The prompt cache on disk: real llama.cpp states saved after an answer and restored by another
model instance (a restart), checked entries, the byte bound, a kill mid-save, and the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from guards import bounded

from edge_runtime.backends.base import SamplingParams, Settings
from edge_runtime.backends.llamacpp.model import LlamaCppModel
from edge_runtime.models.prompt_cache import PromptCacheStore, prefix_hash
from edge_runtime.models.response_cache import ResponseCache

GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
SETTINGS = Settings(n_ctx=1024, n_threads=2)
STUCK_S = 180.0  # a wait that takes longer is a hang (guards.bounded), never a timing


def prompt_of(model: LlamaCppModel, prose: str, n: int, start: int = 0) -> list[int]:
    return model.tokenize(prose[start : start + 8 * n], add_bos=model.info.add_bos)[:n]


def run(model: LlamaCppModel, tokens: list[int]):
    events = list(model.generate(tokens, GREEDY))
    return [e.token for e in events if e.token is not None], events[-1].stats


@pytest.fixture
def store(tmp_path: Path) -> PromptCacheStore:
    return PromptCacheStore(tmp_path / "prompt-cache")


def restarted(path: Path, store: PromptCacheStore | None, settings: Settings = SETTINGS) -> LlamaCppModel:
    """A model as a new process would load it: an empty KV cache, the store on disk."""
    model = LlamaCppModel(str(path), settings)
    model.use_prompt_cache(store)
    return model


def saved_after_answer(path: Path, store: PromptCacheStore, tokens: list[int],
                       settings: Settings = SETTINGS) -> list[int]:
    """Answer ``tokens`` in a model that then closes; the tokens its saved state covers."""
    with restarted(path, store, settings) as model:
        run(model, tokens)
        covered = list(model.slots._slots[0].prefix.tokens)
    return covered


@pytest.mark.parametrize(("model_fixture", "same_as_fresh"), [("smollm2_path", True), ("gemma_path", False)])
def test_a_restart_restores_the_saved_prefix_and_answers_as_the_process_that_never_stopped(
        request, model_fixture, same_as_fresh, store, prose):
    path = request.getfixturevalue(model_fixture)
    with restarted(path, None) as probe:
        first = prompt_of(probe, prose, 120)
    covered = saved_after_answer(path, store, first)
    assert len(store.entries()) == 1 and store.entries()[0].n_tokens == len(covered) > len(first)
    with restarted(path, None) as probe:  # the process that never stopped: the prefix still in memory
        follow_up = covered + prompt_of(probe, prose, 40, start=20_000)
        run(probe, first)
        kept_tokens, kept = run(probe, follow_up)
        probe.reset()
        fresh_tokens, fresh = run(probe, follow_up)
    assert kept.cached_tokens == len(covered) and fresh.cached_tokens == 0
    if same_as_fresh:  # SmolLM2's logits do not depend on how the prompt was split into batches
        assert kept_tokens == fresh_tokens
    with restarted(path, store) as model:
        tokens, stats = run(model, follow_up)
    assert tokens == kept_tokens  # the restored state is the state that was saved
    assert stats.cached_tokens == len(covered)  # restored, counted as cached, not evaluated
    assert stats.evaluated_tokens == len(follow_up) - len(covered)


def test_a_truncated_entry_is_removed_and_the_prompt_evaluated(smollm2_path, store, prose):
    with restarted(smollm2_path, None) as probe:
        first = prompt_of(probe, prose, 80)
    covered = saved_after_answer(smollm2_path, store, first)
    entry = store.entries()[0].path
    with entry.open("r+b") as fh:
        fh.truncate(entry.stat().st_size - 100)
    with restarted(smollm2_path, store) as model:
        assert store.lookup(model.disk.key, covered + [first[5]]) is None  # the size check, before any answer
        assert not entry.exists()
        _, stats = run(model, covered + [first[5]])
    assert stats.cached_tokens == 0 and stats.evaluated_tokens == len(covered) + 1


def test_a_flipped_byte_is_caught_by_the_checksum(smollm2_path, store, prose):
    with restarted(smollm2_path, None) as probe:
        first = prompt_of(probe, prose, 80)
    covered = saved_after_answer(smollm2_path, store, first)
    entry = store.entries()[0].path
    data = bytearray(entry.read_bytes())
    data[-50] ^= 0xFF
    entry.write_bytes(bytes(data))
    with restarted(smollm2_path, store) as model:
        _, stats = run(model, covered + [first[5]])
    assert stats.cached_tokens == 0 and not entry.exists()


def test_entries_of_other_settings_are_not_used_and_foreign_entries_are_removed(smollm2_path, store, prose):
    with restarted(smollm2_path, None) as probe:
        first = prompt_of(probe, prose, 80)
    covered = saved_after_answer(smollm2_path, store, first, Settings(n_ctx=1024, n_threads=2, flash_attn=False))
    with restarted(smollm2_path, store) as model:  # another attention kernel: another key
        key = model.disk.key
        _, stats = run(model, covered + [first[5]])
        assert stats.cached_tokens == 0
        model.disk.flush()
        assert {e.model_key for e in store.entries()} == {key, foreign_key(store, key)}
        # An entry of the other settings put under this key's name is read, found foreign, removed.
        foreign = next(e for e in store.entries() if e.model_key != key)
        for own in (e for e in store.entries() if e.model_key == key):
            own.path.unlink()
        moved = store.folder / key / f"{len(covered)}-{prefix_hash(key, covered)}.kv"
        moved.parent.mkdir(parents=True, exist_ok=True)
        os.replace(foreign.path, moved)
        model.reset()
        assert store.lookup(key, covered + [first[5]]) is None
        assert not moved.exists()


def foreign_key(store: PromptCacheStore, key: str) -> str:
    return next(e.model_key for e in store.entries() if e.model_key != key)


def test_the_byte_bound_evicts_the_least_recently_used(tmp_path):
    key = "k" * 64
    prompts = [[i] * 40 for i in range(4)]
    entry_bytes = PromptCacheStore(tmp_path / "probe").save(key, prompts[0], bytes(900)).stat().st_size
    store = PromptCacheStore(tmp_path / "pc", max_bytes=3 * entry_bytes + entry_bytes // 2)  # room for three
    for i, tokens in enumerate(prompts[:3]):
        store.save(key, tokens, bytes([i]) * 900)
        time.sleep(0.02)
    assert len(store.entries()) == 3
    assert store.lookup(key, prompts[0] + [7]) is not None  # the oldest is used again
    time.sleep(0.02)
    store.save(key, prompts[3], b"x" * 900)
    kept = {e.path.name for e in store.entries()}
    assert store.entry_path(key, prompts[1]).name not in kept  # least recently used: out
    assert {store.entry_path(key, p).name for p in (prompts[0], prompts[2], prompts[3])} <= kept
    assert sum(e.bytes for e in store.entries()) <= store.max_bytes


def test_a_longer_state_supersedes_its_prefixes(tmp_path):
    store = PromptCacheStore(tmp_path / "pc")
    key = "k" * 64
    short, other = list(range(40)), list(range(1, 41))
    store.save(key, short, b"s" * 100)
    store.save(key, other, b"o" * 100)
    assert store.remove_prefixes_of(key, short + [7] * 20) == 1
    assert [e.n_tokens for e in store.entries()] == [40]
    entry = store.lookup(key, other + [3])
    assert entry is not None and entry.tokens == tuple(other) and entry.shared == 40 and entry.state == b"o" * 100
    # A state that cannot be cut back (sliding window, recurrent) serves only prompts extending all of it.
    assert store.lookup(key, other[:30] + [9] * 20).shared == 30
    assert store.lookup(key, other[:30] + [9] * 20, extended_only=True) is None
    assert store.lookup(key, other, extended_only=True) is None
    assert store.lookup(key, other + [3], extended_only=True).shared == 40


# The child writes half of the state into the real temporary file, says so, and waits to be killed.
KILLED_SAVE = """
import contextlib, sys, time
from pathlib import Path
from edge_runtime.models import prompt_cache

real_writer = prompt_cache.atomic_writer

class StopsHalfWay:
    def __init__(self, fh):
        self.fh = fh
    def write(self, data):
        if len(data) < 1 << 20:
            return self.fh.write(data)
        self.fh.write(bytes(data[: len(data) // 2]))
        self.fh.flush()
        print("half", flush=True)
        time.sleep(600)

@contextlib.contextmanager
def stopping_writer(path, mode=None):
    with real_writer(path, mode) as fh:
        yield StopsHalfWay(fh)

prompt_cache.atomic_writer = stopping_writer
prompt_cache.PromptCacheStore(Path(sys.argv[1])).save("k" * 64, list(range(100)), bytes(4 << 20))
print("saved", flush=True)
"""


def test_a_kill_mid_save_leaves_nothing_that_is_trusted(tmp_path):
    folder = tmp_path / "pc"
    child = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "half"
    (temporary,) = (folder / ("k" * 64)).glob(".*.tmp")
    assert 0 < temporary.stat().st_size < 4 << 20  # killed with the state half written
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL and child.stdout.read() == ""
    store = PromptCacheStore(folder)
    assert store.entries() == [] and store.lookup("k" * 64, list(range(120))) is None
    assert list((folder / ("k" * 64)).glob(".*.tmp")) == [temporary]  # the half-written temporary is all there is
    store.clear()
    assert not list(folder.rglob("*.tmp"))


def edgert(edgert_cmd: list[str], home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGERT_HOME": str(home)}
    return subprocess.run([*edgert_cmd, *args], input=stdin, capture_output=True, text=True, env=env, timeout=600)


def test_run_saves_then_restores_and_no_prompt_cache_writes_nothing(edgert_cmd, tmp_path, prose):
    home = tmp_path / "home"
    prompt = prose[:1500]
    opts = ["--model", "smollm2", "--max-tokens", "4", "--temp", "0", "--ctx", "1024", "--json"]
    off = edgert(edgert_cmd, home, "run", prompt, *opts, "--no-prompt-cache")
    assert off.returncode == 0, off.stderr
    assert not (home / "prompt-cache").exists()
    first = edgert(edgert_cmd, home, "run", prompt, *opts)
    again = edgert(edgert_cmd, home, "run", prompt + " And more.", *opts)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    stats = json.loads(again.stdout)["stats"]
    assert stats["cached_tokens"] > stats["evaluated_tokens"] > 0
    ResponseCache(home / "response-cache").put("a" * 64, {"events": []})  # the other kind, as the server writes it
    listed = json.loads(edgert(edgert_cmd, home, "cache", "list", "--json").stdout)
    assert sorted(e["kind"] for e in listed["entries"]) == ["prompt", "prompt", "response"]
    assert {k: t["entries"] for k, t in listed["totals"].items()} == {"prompt": 2, "response": 1}
    assert listed["total_bytes"] == sum(e["bytes"] for e in listed["entries"])
    cleared = json.loads(edgert(edgert_cmd, home, "cache", "clear", "--json").stdout)
    assert cleared["totals"] == listed["totals"] and cleared["total_bytes"] == listed["total_bytes"]
    empty = json.loads(edgert(edgert_cmd, home, "cache", "list", "--json").stdout)
    assert empty["entries"] == [] and {t["entries"] for t in empty["totals"].values()} == {0}
    too_small = edgert(edgert_cmd, home, "run", prompt, *opts, "--prompt-cache-bytes", "0")
    assert too_small.returncode == 2 and "minimum" in too_small.stderr and "Traceback" not in too_small.stderr


def test_chat_resume_continues_without_evaluating_the_conversation_again(edgert_cmd, tmp_path, prose):
    home, saved = tmp_path / "home", tmp_path / "conversation.json"
    opts = ["--model", "smollm2", "--max-tokens", "16", "--temp", "0", "--ctx", "2048"]
    first = edgert(edgert_cmd, home, "chat", *opts, stdin=f"Summarise this: {prose[:1200]}\n/save {saved}\n")
    assert first.returncode == 0 and saved.exists(), first.stderr
    resumed = edgert(edgert_cmd, home, "chat", *opts, "--resume", str(saved), stdin="And in one word?\n/stats\n")
    assert resumed.returncode == 0, resumed.stderr
    found = re.search(r"prompt (\d+) tok \((\d+) cached\)", resumed.stderr)
    assert found, resumed.stderr
    prompt, cached = int(found[1]), int(found[2])
    assert cached > prompt * 0.8  # the saved conversation came back from disk
    bad = edgert(edgert_cmd, home, "chat", *opts, "--resume", str(tmp_path / "missing.json"), stdin="")
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_entries_are_private_to_the_user(tmp_path):
    store = PromptCacheStore(tmp_path / "pc")
    store.folder.mkdir(mode=0o755)  # an older, wider folder is narrowed
    path = store.save("k" * 64, list(range(40)), b"s" * 100)
    modes = {p: p.stat().st_mode & 0o777 for p in (store.folder, path.parent, path)}
    assert modes == {store.folder: 0o700, path.parent: 0o700, path: 0o600}


def test_a_damaged_token_count_is_removed_before_it_is_read(tmp_path):
    store = PromptCacheStore(tmp_path / "pc")
    path = store.save("k" * 64, list(range(40)), b"s" * 100)
    data = bytearray(path.read_bytes())
    data[76:80] = (1 << 30).to_bytes(4, "little")  # n_tokens, after magic, version and key
    path.write_bytes(bytes(data))
    assert PromptCacheStore(store.folder).lookup("k" * 64, list(range(50))) is None
    assert not path.exists()


@contextlib.contextmanager
def unremovable(folder: Path):
    """Files in ``folder`` cannot be removed meanwhile (immutable for root, read-only otherwise)."""
    locks = (["chattr", "+i", str(folder)], ["chattr", "-i", str(folder)]) if os.geteuid() == 0 else None
    if locks:
        subprocess.run(locks[0], check=True)
    else:
        folder.chmod(0o500)
    try:
        yield
    finally:
        subprocess.run(locks[1], check=True) if locks else folder.chmod(0o700)


def test_a_damaged_entry_that_cannot_be_removed_is_a_miss(tmp_path):
    store = PromptCacheStore(tmp_path / "pc")
    path = store.save("k" * 64, list(range(40)), b"s" * 100)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # the state's checksum fails; the header still reads
    path.write_bytes(bytes(data))
    with unremovable(path.parent):
        assert store.lookup("k" * 64, list(range(50))) is None  # once, not again and again
        assert path.exists()


class CopyFails(PromptCacheStore):
    """A store whose part in the copy on the scheduler thread raises (as a full memory would)."""

    def entry_path(self, key, tokens):
        raise MemoryError("no room for the state")


@pytest.mark.parametrize("broken", ["copy raises", "folder unwritable"])
def test_a_failing_save_costs_the_entry_not_the_slot(smollm2_path, tmp_path, prose, broken):
    if broken == "copy raises":
        store = CopyFails(tmp_path / "pc")
    else:
        (tmp_path / "pc").write_text("a file where the folder should be")
        store = PromptCacheStore(tmp_path / "pc")
    model = restarted(smollm2_path, store)
    try:  # every wait bounded, the close too: a stuck slot or writer fails the test, never hangs the run
        first = prompt_of(model, prose, 80)
        answer, _ = run(model, first)
        bounded(model.disk.flush, STUCK_S)
        again, stats = bounded(lambda: run(model, first + answer), STUCK_S)  # the same slot: it was released
    finally:
        bounded(model.close, STUCK_S)
    assert again and stats.cached_tokens > 0


def test_the_cache_swapped_or_closed_mid_answer_fails_no_request(smollm2_path, tmp_path, prose):
    model = restarted(smollm2_path, PromptCacheStore(tmp_path / "a"))
    try:
        first = prompt_of(model, prose, 80)
        old = model.disk
        events = model.generate(first, GREEDY)
        next(events)
        model.use_prompt_cache(PromptCacheStore(tmp_path / "b"))
        model.use_prompt_cache(None)
        assert bounded(lambda: list(events), STUCK_S)[-1].finish_reason is not None
        old.save_later(model.context, 0, list(model.slots._slots[0].prefix.tokens))  # closed: ignored
        bounded(old.flush, STUCK_S)  # returns: nothing was queued for the stopped writer
        _, stats = bounded(lambda: run(model, first), STUCK_S)
    finally:
        bounded(model.close, STUCK_S)
    assert stats.cached_tokens == len(first) - 1


def test_a_state_saved_by_one_slot_restores_into_a_larger_parallel_context(smollm2_path, store, prose):
    # A saved state does not depend on the context size nor on a unified KV store (not in the key).
    covered = saved_after_answer(smollm2_path, store, prompt_of_path(smollm2_path, prose, 120),
                                 Settings(n_ctx=2048, n_threads=2))
    parallel = Settings(n_ctx=4096, n_parallel=2, n_threads=2)
    with restarted(smollm2_path, store, parallel) as model:
        follow_up = covered + prompt_of(model, prose, 40, start=20_000)
        other = prompt_of(model, prose, 60, start=40_000)
        with model.acquire_slot(other) as busy, model.acquire_slot(follow_up) as slot:
            assert slot.seq.seq_id == 1
            list(busy.generate(other, GREEDY))
            events = list(slot.generate(follow_up, GREEDY))
        stats = events[-1].stats
        assert stats.cached_tokens == len(covered)  # restored into sequence 1 of a unified store
        model.use_prompt_cache(None)
        model.reset()
        cold = list(model.generate(follow_up, GREEDY))
    assert [e.token for e in events] == [e.token for e in cold]


def prompt_of_path(path: Path, prose: str, n: int) -> list[int]:
    with restarted(path, None) as probe:
        return prompt_of(probe, prose, n)


class RecordingStore(PromptCacheStore):
    """The real store, recording what each lookup returned."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.served: list[object] = []

    def lookup(self, key, tokens, longer_than=0, **options):
        entry = super().lookup(key, tokens, longer_than, **options)
        self.served.append(entry)
        return entry


def test_a_prefix_another_slot_holds_is_copied_not_read_from_disk(smollm2_path, tmp_path, prose):
    store = RecordingStore(tmp_path / "pc")
    with restarted(smollm2_path, store, Settings(n_ctx=1024, n_parallel=2, n_threads=2)) as model:
        first = prompt_of(model, prose, 100)
        with model.acquire_slot(first) as slot:
            list(slot.generate(first, GREEDY))
            held = list(slot.prefix.tokens)
        model.disk.flush()
        assert [e.n_tokens for e in store.entries()] == [len(held)]
        follow_up = held + prompt_of(model, prose, 20, start=20_000)
        with model.acquire_slot(follow_up) as holder, model.acquire_slot(follow_up) as other:
            assert holder.prefix.tokens == held and other.prefix.tokens == []
            stats = list(other.generate(follow_up, GREEDY))[-1].stats
    assert stats.cached_tokens == len(held)  # copied from the other slot
    assert store.served[-1] is None  # the saved state of the same tokens was not read
