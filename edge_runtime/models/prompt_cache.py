"""The prompt cache on disk: saved KV states of evaluated token prefixes, keyed, checked, bounded.

A backend that can save a sequence's state (llama.cpp) hands it here after a generation with the
tokens it covers; a later request, in this process or the next, gets back the state of the longest
saved prefix of its prompt instead of evaluating it again.

Layout: ``home()/prompt-cache/<model key>/<n tokens>-<tokens hash>.kv``. The model key is the hash
of what makes a state valid (``model_key``: the artifact's sha256 and the settings that shape the
KV cache); the tokens hash is the hash of the model key and the token ids. Each entry holds a
header (magic, version, model key, the token ids themselves, the size and CRC-32 of the state) and
the state bytes. A lookup compares the prompt with the token ids of its model's entries (read once
per entry and remembered) and maps the one sharing the longest prefix; the read checks all of the
header and the state's checksum, and an entry that fails any check is removed, never trusted.
The state is mapped, not copied: a 50 MB state costs one pass of the checksum (a CRC, which
catches damage at a fraction of a cryptographic hash's time: the folder is the user's own)
before llama.cpp copies it into the KV cache, not an allocation, a read and a hash besides.
Entries are written atomically (``files.atomic_writer``), so a process killed mid-save leaves at
most a hidden temporary file, which a later eviction removes. The store is bounded in bytes: the entries used
least recently (their mtime, touched on each hit) go first. Entries hold whole conversations: the
folders are created owner-only (0700) and the files 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.files import atomic_writer, evict_least_recent, touch_used
from edge_runtime.models.locations import home, writable_folder

DEFAULT_MAX_BYTES = 512 << 20  # several full contexts of a small model
FOLDER_NAME = "prompt-cache"
SUFFIX = ".kv"
MAGIC = b"EDGERTKV"
VERSION = 2  # 1 held the state's sha256
_HEADER = struct.Struct("<8sI64sIQI")  # magic, version, model key, n_tokens, state bytes, state CRC-32
STALE_TEMP_S = 600.0  # a hidden temporary file older than this is a save that never finished


def model_key(artifact_sha256: str, kv_settings: dict[str, Any]) -> str:
    """The key of a model's saved states: its file and every setting that changes the KV bytes."""
    text = json.dumps({"artifact_sha256": artifact_sha256, **kv_settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prefix_hash(key: str, tokens: Sequence[int]) -> str:
    """The name part of an entry holding the state of ``tokens`` for model ``key``."""
    digest = hashlib.sha256(key.encode())
    digest.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class CachedPrefix:
    """A checked entry: the tokens its state covers, how many the prompt shares, the state (a
    read-only view of the mapped file, unmapped when the last reference goes; its pages are read
    again from the page cache, or the disk if memory is short, when llama.cpp copies them)."""

    path: Path
    tokens: tuple[int, ...]
    shared: int
    state: memoryview


@dataclass(frozen=True)
class EntryInfo:
    """One entry as ``edgert cache list`` shows it."""

    model_key: str
    n_tokens: int
    bytes: int
    last_used: float
    path: Path

    def to_dict(self) -> dict[str, Any]:
        return {"model_key": self.model_key, "n_tokens": self.n_tokens, "bytes": self.bytes,
                "last_used": self.last_used, "path": str(self.path)}


class PromptCacheStore:
    """Saved KV states under one folder, bounded to ``max_bytes`` (least recently used go first)."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._tokens: dict[Path, tuple[int, ...]] = {}  # entry -> the token ids its header lists

    @classmethod
    def default(cls, max_bytes: int = DEFAULT_MAX_BYTES) -> PromptCacheStore:
        """The store under ``home()`` (created on the first save)."""
        return cls(home() / FOLDER_NAME, max_bytes)

    # -- reading ---------------------------------------------------------------------------

    def lookup(self, key: str, tokens: Sequence[int], longer_than: int = 0, *,
               extended_only: bool = False) -> CachedPrefix | None:
        """The checked entry sharing the longest prefix with ``tokens``, if longer than ``longer_than``.

        An entry covers a prompt and its answer; a later prompt shares its start (the same
        document, another question) or all of it (the next turn). ``extended_only`` accepts only
        entries that ``tokens`` strictly extend: a state that cannot be cut back (a sliding window
        without its early positions, a recurrent state) serves nothing else. Damaged or mismatched
        entries met on the way are removed and the next best one tried.
        """
        rejected: set[Path] = set()  # failed this call (even if it could not be removed): never again
        while True:
            best: tuple[int, Path, tuple[int, ...]] | None = None
            for path in self._paths(key):
                stored = None if path in rejected else self._tokens_of(path, key)
                if stored is None or len(stored) <= longer_than:
                    continue
                shared = common_length(stored, tokens)
                if extended_only and not shared == len(stored) < len(tokens):
                    continue
                if shared > longer_than and (best is None or shared > best[0]):
                    best = (shared, path, stored)
            if best is None:
                return None
            entry = self._read(best[1], key, best[2], best[0])
            if entry is not None:
                touch_used(best[1])
                return entry
            rejected.add(best[1])

    def has(self, key: str, tokens: Sequence[int]) -> bool:
        """Whether the state of exactly ``tokens`` is saved (touched as used when it is)."""
        path = self.entry_path(key, tokens)
        try:
            os.utime(path)
        except OSError:
            return False
        return True

    def entry_path(self, key: str, tokens: Sequence[int]) -> Path:
        return self.folder / key / f"{len(tokens)}-{prefix_hash(key, tokens)}{SUFFIX}"

    def discard(self, path: Path) -> None:
        """Remove an entry that a backend could not restore (wrong size, refused by the runtime)."""
        self._tokens.pop(path, None)
        with contextlib.suppress(OSError):  # a folder we may not write: the entry stays, rejected per lookup
            path.unlink(missing_ok=True)

    def _paths(self, key: str) -> list[Path]:
        try:
            names = os.listdir(self.folder / key)
        except OSError:
            return []
        return [self.folder / key / n for n in names
                if n.endswith(SUFFIX) and not n.startswith(".") and n.split("-", 1)[0].isdigit()]

    def _tokens_of(self, path: Path, key: str) -> tuple[int, ...] | None:
        """The token ids an entry covers, from its header (remembered: a name is never reused for
        other tokens, its hash says which); an entry whose header disagrees with its name is removed."""
        known = self._tokens.get(path)  # .get: another thread may discard it meanwhile
        if known is not None:
            return known
        try:
            with path.open("rb") as fh:
                _, stored, _, _ = _read_header(fh, key)
            if path.name != f"{len(stored)}-{prefix_hash(key, stored)}{SUFFIX}":
                raise ValueError("tokens other than its name says")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, struct.error):
            self.discard(path)
            return None
        if len(self._tokens) >= 4096:
            self._tokens.clear()
        self._tokens[path] = stored
        return stored

    def _read(self, path: Path, key: str, tokens: Sequence[int], shared: int) -> CachedPrefix | None:
        """The entry at ``path`` if every check passes; otherwise it is removed and None returned."""
        try:
            with path.open("rb") as fh:
                size, stored, n_state, crc = _read_header(fh, key)
                if stored != tuple(tokens):
                    raise ValueError("other tokens")
                state = _state_view(fh, size, n_state)
                if zlib.crc32(state) != crc:
                    raise ValueError("state checksum")
        except FileNotFoundError:
            return None  # evicted meanwhile (by another process)
        except (OSError, ValueError, struct.error):
            self.discard(path)
            return None
        return CachedPrefix(path, tuple(tokens), shared, state)

    # -- writing ---------------------------------------------------------------------------

    def save(self, key: str, tokens: Sequence[int], state: bytes | memoryview, *, evict: bool = True) -> Path:
        """Write the state of ``tokens`` atomically (owner-only), then evict down to the bound
        unless ``evict`` is False (the caller evicts, to tell its failures apart)."""
        path = self.entry_path(key, tokens)
        _private_folder(self.folder)
        _private_folder(path.parent)
        header = _HEADER.pack(MAGIC, VERSION, key.encode("ascii"), len(tokens), len(state), zlib.crc32(state))
        with atomic_writer(path, mode=0o600) as fh:
            fh.write(header)
            fh.write(struct.pack(f"<{len(tokens)}i", *tokens))
            fh.write(state)
        if evict:
            self.evict()
        return path

    def remove_prefixes_of(self, key: str, tokens: Sequence[int]) -> int:
        """Remove the entries whose tokens are a strict prefix of ``tokens`` (a longer entry, just
        saved, serves every prompt they served); how many went."""
        removed = 0
        for path in self._paths(key):
            stored = self._tokens_of(path, key)
            if stored is not None and len(stored) < len(tokens) and common_length(stored, tokens) == len(stored):
                self.discard(path)
                removed += 1
        return removed

    def evict(self) -> int:
        """Remove the least recently used entries until the store fits its bound; bytes freed."""
        freed = evict_least_recent((e.path for e in self.entries()), self.max_bytes)
        self._remove_stale_temporaries()
        return freed

    def clear(self) -> tuple[int, int]:
        """Remove every entry; (entries, bytes) removed."""
        entries = self.entries()
        for entry in entries:
            entry.path.unlink(missing_ok=True)
        self._remove_stale_temporaries(0.0)
        for folder in self._model_folders():
            with contextlib.suppress(OSError):  # something new arrived meanwhile
                folder.rmdir()
        return len(entries), sum(e.bytes for e in entries)

    # -- listing ---------------------------------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        """Every entry, newest use first."""
        found = []
        for folder in self._model_folders():
            try:
                files = list(folder.iterdir())
            except OSError:  # removed meanwhile (another process's clear)
                continue
            for file in files:
                name = file.name
                if name.startswith(".") or not name.endswith(SUFFIX) or not name.split("-", 1)[0].isdigit():
                    continue
                try:
                    st = file.stat()
                except OSError:
                    continue
                found.append(EntryInfo(folder.name, int(name.split("-", 1)[0]), st.st_size, st.st_mtime, file))
        return sorted(found, key=lambda e: -e.last_used)

    def _model_folders(self) -> list[Path]:
        try:
            return [p for p in self.folder.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            return []

    def _remove_stale_temporaries(self, older_than_s: float = STALE_TEMP_S) -> None:
        now = time.time()
        for folder in self._model_folders():
            with contextlib.suppress(OSError):
                stale = list(folder.glob(".*.tmp"))
            for file in stale:
                with contextlib.suppress(OSError):
                    if now - file.stat().st_mtime >= older_than_s:
                        file.unlink()


def _read_header(fh: Any, key: str) -> tuple[int, tuple[int, ...], int, int]:
    """(file size, token ids, state bytes, state CRC-32) of an entry open at its start; ValueError
    when the header is another format's or model's or its sizes do not add up to the file's. The
    sizes are checked before the token ids are read: a damaged count cannot make us read (or
    allocate) more than the file holds."""
    size = os.fstat(fh.fileno()).st_size
    magic, version, stored_key, n_tokens, n_state, crc = _HEADER.unpack(fh.read(_HEADER.size))
    if (magic, version, stored_key.decode("ascii", "replace")) != (MAGIC, VERSION, key):
        raise ValueError("another format or model")
    if size != _HEADER.size + 4 * n_tokens + n_state:
        raise ValueError("sizes do not add up")
    return size, struct.unpack(f"<{n_tokens}i", fh.read(4 * n_tokens)), n_state, crc


def _state_view(fh: Any, size: int, n_state: int) -> memoryview:
    """The last ``n_state`` bytes of the open entry: mapped (no copy), or read where the file
    cannot be mapped (a file system without mmap, no address space left), never a reason to
    drop a sound entry. Entries are replaced by rename and removed by unlink, never rewritten in
    place: the mapping keeps the file it opened, whatever happens to its name."""
    try:
        return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))[size - n_state:]
    except (OSError, ValueError, MemoryError):
        state = bytearray(n_state)
        fh.seek(size - n_state)
        if fh.readinto(state) != n_state:
            raise ValueError("state shorter than its header says") from None
        return memoryview(state)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _private_folder(folder: Path) -> Path:
    """``folder`` created owner-only (0700; an older, wider one is narrowed), for a writer."""
    with contextlib.suppress(OSError):  # writable_folder reports what went wrong, in one line
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
    return writable_folder(folder)


# The runtimes whose sequence state can be saved and restored (ONNX Runtime GenAI and LiteRT keep
# their caches inside the runtime, with no way to write them out).
SUPPORTED_BACKENDS = ("llama.cpp",)


def attach(model: Any, store: PromptCacheStore | None) -> bool:
    """Point a loaded model at ``store`` (None: off); False when its backend cannot save its state."""
    use = getattr(model, "use_prompt_cache", None)
    if use is None:
        return False
    use(store)
    return True


def support_reason(backend: str, *, split: bool = False) -> str:
    """The plan's reason line saying whether a model on ``backend`` can use the prompt cache."""
    if backend not in SUPPORTED_BACKENDS:
        return f"prompt cache: not supported for {backend} (its runtime cannot save a sequence's KV state)"
    if split:
        return "prompt cache: not supported for a model split across RPC workers"
    return "prompt cache: supported (KV states of evaluated prompts saved on disk, restored by later requests)"
