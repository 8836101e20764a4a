"""Which artifact files can be opened as they are: checked against their manifest's sha256, kept
inside their folder, and remembered, so a device does not hash gigabytes at every start.

``home()/verified.json`` is the record. For each artifact path it keeps the stamp of its files
(inode, size, mtime_ns of each) when they were last hashed and the sha256 they had then: a file
whose stamp has not changed is not hashed again, one whose stamp changed is. It also keeps the
sha256 of every file a trial load ran cleanly (``backends.trial_load``), so neither the same file
nor a renamed copy of it is tried twice, per purpose: ``trusted`` holds the files that generated
cleanly, ``trusted_embeddings`` those that only embedded cleanly (an encoder such as BERT embeds
but aborts llama.cpp when asked to generate, so that trust does not carry over; a file trusted to
generate is trusted to embed). The record is a cache: losing it costs a re-hash, and a
changed file is never taken for the file it replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import EdgeRuntimeError, InvalidModelFileError
from edge_runtime.files import atomic_write, file_sha256, parse_json, read_regular_file
from edge_runtime.formats.containment import check_no_escaping_links, resolves_inside
from edge_runtime.formats.tflite import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, sidecar_path
from edge_runtime.models.artifact import Artifact
from edge_runtime.models.embedded import EMBEDDED, installed_file
from edge_runtime.models.locations import home, store_root
from edge_runtime.models.manifest import folder_sha256

RECORD_NAME = "verified.json"
RECORD_SCHEMA = "edge-runtime.verified"
RECORD_MAX_BYTES = 16 << 20  # a few hundred bytes per verified file
MAX_TRUSTED = 4096  # remembered trial loads per purpose; the oldest go first
_TRUSTED_KEYS = {"generation": "trusted", "embeddings": "trusted_embeddings"}

Stamp = list[list[Any]]  # [relative path, inode, size, mtime_ns] of each file


@dataclass(frozen=True)
class Verdict:
    """What is known of an artifact's files before a backend opens them."""

    sha256: str | None  # None: not hashed (nothing asked for it)
    trusted: bool  # an embedded model's known file, or a file a trial load ran cleanly for the purpose


def check_artifact(artifact: Artifact, *, need_sha256: bool, purpose: str = "generation") -> Verdict:
    """Check an artifact's files before loading: links, the manifest's sha256, known files.

    An artifact from a manifest (a store entry or a convert folder) must lie inside the manifest's
    folder, links followed, and match its recorded sha256 (``InvalidModelFileError`` otherwise);
    an embedded model's file is trusted when it matches the sha256 its package is known by. Any
    other file is hashed only when ``need_sha256`` (to look it up among the files trial-loaded
    for ``purpose``: "generation" or "embeddings").
    """
    path = Path(artifact.path)
    if artifact.sha256:
        _check_inside_manifest_folder(path, artifact.format)
        actual = recorded_sha256(path)
        if actual != artifact.sha256:
            raise InvalidModelFileError(
                f"{path}: its sha256 {actual[:12]}… does not match the manifest's {artifact.sha256[:12]}…",
                f"check the model with `edgert models verify {_verify_name(path)}`, "
                "then add or convert it again")
        return Verdict(actual, _is_trusted(actual, purpose))
    known = _embedded_sha256(path)
    if known is not None:
        actual = recorded_sha256(path)
        if actual == known:
            return Verdict(actual, True)
        return Verdict(actual, _is_trusted(actual, purpose))
    if not need_sha256:
        return Verdict(None, False)
    actual = recorded_sha256(path)
    return Verdict(actual, _is_trusted(actual, purpose))


def _is_trusted(sha256: str, purpose: str) -> bool:
    """Whether a trial ran this file cleanly for ``purpose`` (a generation trial covers embeddings too)."""
    record = _read_record()
    keys = ("trusted",) if purpose == "generation" else ("trusted", _TRUSTED_KEYS[purpose])
    return any(sha256 in record[key] for key in keys)


def remember_trusted(sha256: str, purpose: str = "generation") -> None:
    """Record that a file of this sha256 loaded and ran cleanly for ``purpose`` in a trial process
    ("generation": it generated; "embeddings": it embedded)."""
    key = _TRUSTED_KEYS[purpose]

    def change(record: dict[str, Any]) -> None:
        trusted = record[key]
        trusted[sha256] = {"trial_loaded_at": int(time.time())}
        if len(trusted) > MAX_TRUSTED:
            oldest = sorted(trusted, key=lambda k: trusted[k].get("trial_loaded_at", 0))
            for old in oldest[: len(trusted) - MAX_TRUSTED]:
                del trusted[old]

    _update_record(change)


def recorded_sha256(path: Path) -> str:
    """The sha256 of a file or folder artifact, hashed again only when its stamp changed."""
    key = os.path.abspath(path)
    stamp = _stamp(path)  # before hashing: a file changing meanwhile gets a new stamp, so a re-hash
    entry = _read_record()["files"].get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = folder_sha256(path) if path.is_dir() else file_sha256(path)

    def change(record: dict[str, Any]) -> None:
        record["files"][key] = {"stamp": stamp, "sha256": digest}
        for gone in [k for k in record["files"] if not os.path.exists(k)]:
            del record["files"][gone]

    _update_record(change)
    return digest


def _stamp(path: Path) -> Stamp:
    """What changes when a file's bytes can have changed: inode, size and mtime of each file."""
    files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
    stamp = []
    for file in files:
        st = file.stat()
        stamp.append([file.relative_to(path).as_posix() if file != path else "", st.st_ino, st.st_size,
                      st.st_mtime_ns])
    return stamp


def _check_inside_manifest_folder(path: Path, fmt: str) -> None:
    """An artifact and the files loaded with it lie inside its manifest's folder (the store
    hard-links or copies; it never links to a file elsewhere)."""
    folder = path.parent
    files = [path]
    if fmt == "tflite":  # read beside it: the converter's description and the tokenizer
        files += [sidecar_path(path), folder / TOKENIZER_FILE, folder / TOKENIZER_CONFIG_FILE]
    for file in files:
        if (file.exists() or file.is_symlink()) and not resolves_inside(file, folder):
            raise InvalidModelFileError(f"{file}: a link to {os.path.realpath(file)}, outside {folder}",
                                        "store the file itself: `edgert models add` copies or hard-links it")
    if path.is_dir():
        check_no_escaping_links(path)


def _verify_name(path: Path) -> str:
    """What to give `edgert models verify` for the model holding ``path``."""
    folder = path.parent
    return folder.name if folder.parent == store_root() else str(folder)


def _embedded_sha256(path: Path) -> str | None:
    """The known sha256 when ``path`` is an installed embedded model's file, else None."""
    for model in EMBEDDED:
        if model.sha256 and path.name == model.filename:
            found = installed_file(model)
            if found is not None and os.path.abspath(found) == os.path.abspath(path):
                return model.sha256
    return None


def _record_path() -> Path:
    return home() / RECORD_NAME


def _read_record() -> dict[str, Any]:
    """The record, or an empty one when it is missing or damaged (it is only a cache)."""
    empty: dict[str, Any] = {"schema": RECORD_SCHEMA, "files": {}, "trusted": {}, "trusted_embeddings": {}}
    try:
        data = parse_json(read_regular_file(_record_path(), RECORD_MAX_BYTES), str(_record_path()))
    except EdgeRuntimeError:  # missing, not a file, too big, not JSON or nested too deep
        return empty
    if not isinstance(data, dict) or data.get("schema") != RECORD_SCHEMA:
        return empty
    if not isinstance(data.get("files"), dict) or not isinstance(data.get("trusted"), dict):
        return empty
    if not isinstance(data.get("trusted_embeddings"), dict):  # a record from before embeddings were trusted
        data["trusted_embeddings"] = {}
    return data


def _update_record(change: Callable[[dict[str, Any]], None]) -> None:
    """Read, change and rewrite the record under a lock; a read-only home just skips it."""
    try:
        with _locked():
            record = _read_record()
            change(record)
            atomic_write(_record_path(), json.dumps(record, sort_keys=True) + "\n")
    except OSError:
        pass  # nothing remembered: the next start hashes again


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold ``home()/.verified.lock`` so that two processes do not drop each other's entries."""
    folder = home()
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f".{RECORD_NAME}.lock", "a+b") as handle:
        try:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except ImportError:  # Windows: no advisory locks; a lost entry is only hashed again
            pass
        yield
