"""Files: writing so that nothing is lost (a temporary name in the same folder, then a rename),
reading files that may be hostile, and hashing.

``atomic_write`` for bytes or text, ``atomic_writer`` to stream into a file, ``atomic_path`` for a
library that writes to a path itself, ``replace_folder`` for a folder built under a temporary name.
Each replaces only a regular file: never a device, a pipe, a socket or a folder that happens to
sit at the path. ``read_regular_file`` reads a bounded regular file, ``parse_json`` a document
of bounded depth.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from edge_runtime.errors import InvalidConfigError
from edge_runtime.limits import MAX_JSON_DEPTH

_JSON_STRING = re.compile(rb'"[^"]*"')
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1, +1, -1, -1 as int8
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")

# Read once at import (setting it is the only way to read it, and that is not thread-safe).
_UMASK = os.umask(0o022)
os.umask(_UMASK)

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (``a character device``)."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _cannot_write(path: str | os.PathLike[str], exc: OSError) -> InvalidConfigError:
    return InvalidConfigError(f"{os.fspath(path)}: cannot write it ({exc.strerror or exc})",
                              "choose a path in a folder you can write")


def write_target(path: str | os.PathLike[str]) -> Path:
    """Where a write of ``path`` lands: the path itself, or the regular file a link there names.

    Raises ``InvalidConfigError`` for anything there but a regular file; a command that works a
    long time before it writes checks its output path with this first.
    """
    target = Path(path)
    try:
        mode = os.stat(target).st_mode  # follows a link: what is replaced is what it names
    except FileNotFoundError:
        if target.is_symlink():
            raise InvalidConfigError(f"{target}: a symbolic link to nothing; not replaced") from None
        return target
    except OSError as exc:
        raise _cannot_write(target, exc) from None
    if not stat.S_ISREG(mode):
        raise InvalidConfigError(f"{target}: {file_kind(mode)}, not a regular file; only a regular file is replaced",
                                 "choose another path")
    return Path(os.path.realpath(target)) if target.is_symlink() else target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` for a writer that wants a path (a library's own writer).

    When the block ends normally the file is flushed to disk and renamed to ``path``, so readers
    see the old file or the new one, never half; when it raises, the temporary file is removed.
    Anything at ``path`` but a regular file (a device, a pipe, a folder) is refused, not replaced.
    """
    target = write_target(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _cannot_write(path, exc) from None
    tmp = Path(name)
    try:
        # mkstemp makes the file owner-only; give it the mode any other new file would get
        # (or ``mode``: private data stays private from its first byte).
        os.fchmod(fd, 0o666 & ~_UMASK if mode is None else mode)
        os.close(fd)
        yield tmp
        try:
            with tmp.open("rb+") as fh:
                os.fsync(fh.fileno())
            write_target(target)  # the same check again: something may have appeared meanwhile
            os.replace(tmp, target)
        except OSError as exc:
            raise _cannot_write(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to stream into; it replaces ``path`` only once the block finishes (``atomic_path``)."""
    with atomic_path(path, mode) as tmp, tmp.open("wb") as fh:
        yield fh


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    with atomic_writer(path) as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def replace_folder(staging: Path, target: Path) -> None:
    """Rename the finished folder ``staging`` to ``target``; an old ``target`` goes only once replaced."""
    if not target.exists():
        os.replace(staging, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".trash-{target.name}-", dir=target.parent))
    os.replace(target, trash / "old")
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(trash / "old", target)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def touch_used(path: Path) -> None:
    """Mark a cache file as just used (its mtime), which ``evict_least_recent`` keeps longest;
    a file removed meanwhile has nothing to mark."""
    with contextlib.suppress(OSError):
        os.utime(path)


def evict_least_recent(files: Iterable[Path], max_bytes: int) -> int:
    """Remove the least recently used of ``files`` (oldest mtime first) until the rest hold at
    most ``max_bytes``; the bytes freed. Files another process removes meanwhile are skipped."""
    entries = []
    for path in files:
        with contextlib.suppress(OSError):
            info = path.stat()
            entries.append((info.st_mtime_ns, info.st_size, path))
    total = sum(size for _, size, _ in entries)
    freed = 0
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total - freed <= max_bytes:
            break
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # removed meanwhile: its bytes are gone all the same
        except OSError:
            continue  # still there (a read-only folder): not freed
        freed += size
    return freed


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def read_regular_file(path: str | os.PathLike[str], limit: int, what: str = "file") -> bytes:
    """The bytes of ``path``: a regular file of at most ``limit`` bytes, else a one-line error.

    The file is opened without blocking (a named pipe would wait for a writer) and checked on
    the open descriptor before a byte is read; at most ``limit + 1`` bytes are ever read, so a
    device such as /dev/zero or a file that grows meanwhile cannot fill the memory.
    """
    shown = os.fspath(path)
    try:
        fd = os.open(shown, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InvalidConfigError(f"{shown}: no such file") from None
    except OSError as exc:
        raise InvalidConfigError(f"{shown}: cannot read it ({exc.strerror or exc})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidConfigError(f"{shown}: {file_kind(info.st_mode)}, not a regular file",
                                     f"give a {what} to read")
        too_big = InvalidConfigError(f"{shown}: larger than {_amount(limit)}, the most a {what} may be")
        if info.st_size > limit:
            raise too_big
        chunks, total = [], 0
        while total <= limit and (chunk := os.read(fd, min(1 << 20, limit + 1 - total))):
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise too_big
        return b"".join(chunks)
    except OSError as exc:
        raise InvalidConfigError(f"{shown}: cannot read it ({exc.strerror or exc})") from None
    finally:
        os.close(fd)


def _amount(n: int) -> str:
    return f"{n / (1 << 20):g} MiB" if n >= 1 << 20 else f"{n} bytes"


def parse_json(data: bytes | str, source: str, hint: str | None = None, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A JSON document from untrusted bytes or text; every flaw is one ``InvalidConfigError`` line.

    Nesting is bounded (``max_depth``): Python's decoder and every reader after it recurse once
    per level, so a file of a hundred thousand brackets must stop here. The message names
    ``source`` and where the text breaks, never the text itself.
    """
    raw = data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass")
    if json_depth(raw) > max_depth:
        raise InvalidConfigError(f"{source}: JSON nested deeper than {max_depth} levels", hint)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidConfigError(f"{source}: not UTF-8 text (byte {exc.start})", hint) from None
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        cut = " (the file looks truncated)" if exc.pos >= len(data.rstrip()) - 1 and data.strip() else ""
        raise InvalidConfigError(f"{source}: not valid JSON at line {exc.lineno} column {exc.colno}: "
                                 f"{exc.msg}{cut}", hint) from None
    except ValueError:  # an integer past Python's limit on digits
        raise InvalidConfigError(f"{source}: not valid JSON: a number has too many digits", hint) from None
    except RecursionError:  # malformed text the bracket count measured short; json.loads recursed
        raise InvalidConfigError(f"{source}: JSON nested deeper than {max_depth} levels", hint) from None
    return doc


def json_depth(raw: bytes) -> int:
    """How deeply the arrays and objects of a JSON text nest, without recursing (0 for a scalar).

    Strings are cut out first (escaped backslashes, then escaped quotes, then everything between
    quotes), so brackets inside them do not count; then every opening bracket counts +1 and
    every closing one -1, and the depth is the largest running sum. Malformed text may measure
    oddly, but ``json.loads`` refuses it afterwards anyway.
    """
    import numpy as np

    unquoted = _JSON_STRING.sub(b"", raw.replace(b"\\\\", b"").replace(b'\\"', b""))
    steps = unquoted.translate(_BRACKET_STEPS, _NOT_BRACKETS)
    if not steps:
        return 0
    return max(0, int(np.cumsum(np.frombuffer(steps, dtype=np.int8), dtype=np.int64).max()))
