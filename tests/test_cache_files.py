"""The cache files' edges: an older entry format, a file that cannot be mapped, an eviction that cannot remove."""

from __future__ import annotations

import mmap
import struct

from test_prompt_cache import unremovable

from edge_runtime.files import evict_least_recent
from edge_runtime.models.prompt_cache import PromptCacheStore

KEY = "k" * 64
TOKENS = list(range(40))


def test_an_entry_of_the_previous_format_is_removed_not_trusted(tmp_path):
    store = PromptCacheStore(tmp_path / "pc")
    path = store.save(KEY, TOKENS, b"s" * 100)
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("<I", 1)  # format 1 held a sha256 where format 2 holds a CRC-32
    path.write_bytes(bytes(data))
    assert PromptCacheStore(store.folder).lookup(KEY, TOKENS + [1]) is None
    assert not path.exists()


def test_a_state_that_cannot_be_mapped_is_read_instead(tmp_path, monkeypatch):
    store = PromptCacheStore(tmp_path / "pc")
    path = store.save(KEY, TOKENS, b"state bytes" * 10)

    def no_mmap(*args, **kwargs):
        raise OSError(19, "No such device")  # what a file system without mmap answers

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    entry = PromptCacheStore(store.folder).lookup(KEY, TOKENS + [1])
    assert entry is not None and bytes(entry.state) == b"state bytes" * 10 and entry.shared == 40
    assert path.exists()  # a sound entry stays


def test_eviction_counts_only_what_it_removed(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    files = []
    for i in range(3):
        files.append(folder / f"{i}.bin")
        files[-1].write_bytes(b"x" * 100)
    with unremovable(folder):
        assert evict_least_recent(files, 100) == 0
    assert all(f.exists() for f in files)
    assert evict_least_recent(files, 100) == 200 and sum(f.exists() for f in files) == 1
