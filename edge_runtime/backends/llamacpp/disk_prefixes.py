"""The llama.cpp side of the prompt cache on disk: what a sequence saves and how it is restored.

The store (``models.prompt_cache``) keeps the files; this part knows the model's key, reads an
entry on the requesting thread (so the scheduler thread does not wait for the disk; only pages of
the mapped state that memory pressure evicted meanwhile are read again), restores it into a
sequence on the scheduler thread (``llama_state_seq_set_data``), and after an answer copies the
sequence's state out (``llama_state_seq_get_data``, milliseconds per MiB) and hands it to a writer
thread, so the disk write delays no other request.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.backends.llamacpp import native
from edge_runtime.models.prompt_cache import CachedPrefix, PromptCacheStore, model_key

if TYPE_CHECKING:
    from edge_runtime.backends.base import Settings

log = logging.getLogger("edge_runtime.prompt_cache")

# Shorter prefixes are evaluated faster than a file is read and checked: not worth an entry.
MIN_SAVED_TOKENS = 32
# States copied but not yet written (queued or being written); past this a busy server skips
# saves rather than hold their memory: at most this many states are held at once.
MAX_PENDING_SAVES = 2


def kv_settings(settings: Settings, library_version: str) -> dict[str, object]:
    """What, besides the weights, decides the bytes of a saved state (its part of the key).

    Not the context size nor a unified KV store: a sequence's state lists its cells' positions
    and their K/V rows, and restores into any context with room for them (``serve --parallel N``
    saves what ``chat --resume`` restores).
    """
    return {"type_k": settings.type_k, "type_v": settings.type_v, "flash_attn": settings.flash_attn,
            "swa_full": native.SWA_FULL, "llama_cpp": library_version}


class DiskPrefixes:
    """One model's view of a prompt-cache store, with the thread that writes its entries.

    Nothing here fails a request: a cache that cannot be read is a miss, one that cannot be
    written costs the entry (logged), never the answer.
    """

    def __init__(self, store: PromptCacheStore, artifact_sha256: str, settings: Settings,
                 library_version: str, *, whole_states_only: bool) -> None:
        self.store = store
        # A state that cannot be cut back (a sliding window that no longer holds the early
        # positions, a recurrent state) serves only prompts that extend all of it, and a longer
        # entry does not replace the shorter ones.
        self._whole_only = whole_states_only
        self.key = model_key(artifact_sha256, kv_settings(settings, library_version))
        self._saved: set[str] = set()  # entries known on disk: no stat on the scheduler thread
        self._pending = 0  # states handed to the writer and not yet written
        self._closed = False
        self._lock = threading.Lock()
        self._writes: queue.Queue[tuple[list[int], memoryview | None] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="edgert-prompt-cache", daemon=True)
        self._writer.start()

    def lookup(self, tokens: Sequence[int], longer_than: int) -> CachedPrefix | None:
        """The saved state of the longest prefix of ``tokens`` longer than ``longer_than`` tokens
        (None on any failure: a cache that cannot be read is a miss)."""
        if len(tokens) <= max(longer_than, MIN_SAVED_TOKENS):
            return None
        try:
            entry = self.store.lookup(self.key, tokens, longer_than, extended_only=self._whole_only)
        except Exception as exc:
            log.warning("prompt cache: lookup failed, evaluating the prompt: %s", exc)
            return None
        if entry is not None:
            self._saved.add(entry.path.name)
        return entry

    def restore(self, ctx: native.NativeContext, seq_id: int, entry: CachedPrefix) -> bool:
        """Put ``entry`` in sequence ``seq_id`` (scheduler thread); an entry llama.cpp refuses is removed."""
        if ctx.set_seq_state(seq_id, entry.state):
            return True
        log.info("prompt cache: llama.cpp refused %s; removed it", entry.path.name)
        self._saved.discard(entry.path.name)
        self.store.discard(entry.path)
        return False

    def save_later(self, ctx: native.NativeContext, seq_id: int, tokens: list[int]) -> None:
        """Copy the state of ``tokens`` in sequence ``seq_id`` now (scheduler thread), write it later.

        Never raises (a failed copy costs the entry); a no-op once closed.
        """
        try:
            with self._lock:
                if self._closed or len(tokens) < MIN_SAVED_TOKENS or self._pending >= MAX_PENDING_SAVES:
                    return
                if self.store.entry_path(self.key, tokens).name in self._saved:
                    state = None  # on disk already: the writer only marks it used
                elif ctx.seq_state_size(seq_id) > self.store.max_bytes:
                    return  # would evict everything, itself included
                else:
                    state = ctx.seq_state(seq_id)
                self._pending += 1
                self._writes.put((list(tokens), state))
        except Exception as exc:  # MemoryError for the copy, anything else: the answer is out already
            log.warning("prompt cache: could not copy the state of %d tokens: %s", len(tokens), exc)

    def flush(self) -> None:
        """Wait until every state handed over is on disk."""
        self._writes.join()

    def close(self) -> None:
        """Finish the writes in hand, then stop the writer (later saves are ignored)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._writes.put(None)
        self._writer.join()

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                self._write(*item)
            finally:
                if item is not None:
                    with self._lock:
                        self._pending -= 1
                self._writes.task_done()

    def _write(self, tokens: list[int], state: memoryview | None) -> None:
        """Save one state (writer thread); ``None``: it is on disk, mark it used."""
        name = self.store.entry_path(self.key, tokens).name
        if self.store.has(self.key, tokens):  # touched: saved before, by us or another process
            self._saved.add(name)
            return
        self._saved.discard(name)  # evicted meanwhile
        if state is None:
            return
        try:
            path: Path = self.store.save(self.key, tokens, state, evict=False)
            self._saved.add(name)
            log.debug("prompt cache: saved %d tokens (%d bytes) as %s", len(tokens), len(state), path.name)
        except Exception as exc:  # a full disk or a read-only home costs the cache, not the answer
            log.warning("prompt cache: could not save %d tokens: %s", len(tokens), exc)
            return
        try:
            self.store.evict()
            if not self._whole_only:
                self.store.remove_prefixes_of(self.key, tokens)
        except Exception as exc:
            log.warning("prompt cache: could not evict old entries: %s", exc)
