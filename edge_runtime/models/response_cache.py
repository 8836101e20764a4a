"""The response cache on disk: answers to exact repeats of deterministic requests, bounded in bytes.

One JSON file per answer, named by its key (``response_key``: the sha256 of the artifact's
sha256, the load settings, the rendered prompt's tokens and the sampling parameters, constraint
included). Writes are atomic (``files.atomic_write``); a file that does not read back as an entry
of its own key (truncated, edited, another format) is ignored and removed. Past ``max_bytes`` the
least recently used entries go first: a hit touches its file's mtime, eviction takes the oldest.

What an entry holds is the answer's token events as plain JSON (the runtime layers above turn
them back into events); this module knows nothing of models or HTTP.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.files import atomic_write, evict_least_recent, parse_json, read_regular_file, touch_used
from edge_runtime.models.locations import home, writable_folder

ENTRY_FORMAT = 1
DEFAULT_MAX_BYTES = 64 << 20
_SUFFIX = ".json"


def response_key(artifact_sha256: str, settings: Mapping[str, Any], prompt: Sequence[int],
                 sampling: Mapping[str, Any]) -> str:
    """The hex sha256 naming one answer: any change of artifact, settings, prompt or sampling is another key."""
    document = {"artifact": artifact_sha256, "settings": dict(settings), "prompt": [int(t) for t in prompt],
                "sampling": dict(sampling)}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_plain)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _plain(value: Any) -> Any:
    """What JSON lacks a word for, in a stable form (tuples are lists already; sets sorted)."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"a {type(value).__name__} has no stable JSON form for a cache key")


def default_folder() -> Path:
    """``home()/response-cache``."""
    return home() / "response-cache"


class ResponseCache:
    """Entries (JSON objects) by key in ``folder``, at most ``max_bytes`` of them on disk."""

    def __init__(self, folder: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = folder if folder is not None else default_folder()
        self.max_bytes = max_bytes

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a response key: {key!r}")
        return self.folder / f"{key}{_SUFFIX}"

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry stored under ``key``, or None; a damaged entry is removed and counts as none."""
        path = self._path(key)
        try:
            data = read_regular_file(path, self.max_bytes, "response cache entry")
            entry = parse_json(data, str(path))
        except EdgeRuntimeError:
            if path.exists() or path.is_symlink():
                _remove(path)
            return None
        if not isinstance(entry, dict) or entry.get("format") != ENTRY_FORMAT or entry.get("key") != key:
            _remove(path)
            return None
        touch_used(path)
        return entry

    def put(self, key: str, entry: Mapping[str, Any]) -> bool:
        """Store ``entry`` under ``key`` (atomically), then evict down to the bound; False if it
        could not be stored (larger than the whole bound, or the folder is not writable)."""
        data = json.dumps({**entry, "format": ENTRY_FORMAT, "key": key}, ensure_ascii=False,
                          separators=(",", ":")).encode("utf-8")
        if len(data) > self.max_bytes:
            return False
        try:
            writable_folder(self.folder)
            atomic_write(self._path(key), data)
        except EdgeRuntimeError:
            return False
        self.evict()
        return True

    def evict(self) -> None:
        """Remove the least recently used entries until the rest fit ``max_bytes``."""
        evict_least_recent(self.folder.glob(f"*{_SUFFIX}"), self.max_bytes)

    def size_bytes(self) -> int:
        """Bytes the entries take on disk now."""
        return sum(size for _, size, _ in self.entries())

    def entries(self) -> list[tuple[Path, int, float]]:
        """(path, bytes, last used) of every entry, most recently used first (``edgert cache list``)."""
        found = []
        with contextlib.suppress(OSError):  # no folder yet, or removed meanwhile
            for path in self.folder.glob(f"*{_SUFFIX}"):
                with contextlib.suppress(OSError):
                    info = path.stat()
                    found.append((path, info.st_size, info.st_mtime))
        return sorted(found, key=lambda e: -e[2])

    def remove(self, key: str) -> None:
        """Forget the entry under ``key`` (one that read back but could not be replayed)."""
        _remove(self._path(key))

    def clear(self) -> tuple[int, int]:
        """Remove every entry; (entries, bytes) removed."""
        entries = self.entries()
        for path, _, _ in entries:
            _remove(path)
        return len(entries), sum(size for _, size, _ in entries)


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
