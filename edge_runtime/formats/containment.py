"""Paths a model file names, kept inside the model's folder: no absolute paths, no ``..``, and no
link whose target lies outside (a model must not make a runtime read any file the user can)."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from edge_runtime.errors import InvalidModelFileError

_HINT = "copy the real files into the folder, or convert the model again"


def resolves_inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, links followed, lies inside ``folder`` (links followed too)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def inside_folder(folder: Path, name: str, what: str) -> Path:
    """``folder/name`` when that stays inside ``folder``, else an error naming ``what``.

    ``name`` comes from a model file: an absolute path, a drive, a ``..`` (either slash) or a
    link whose target lies outside is refused.
    """
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if (not name or "\0" in name or posix.is_absolute() or windows.anchor
            or ".." in posix.parts or ".." in windows.parts):
        raise InvalidModelFileError(f"{what} {name[:80]!r} is outside the folder", "convert the model again")
    if len(name.encode()) > 1024 or any(len(part.encode()) > 255 for part in posix.parts):
        raise InvalidModelFileError(f"{what} {name[:80]!r}... is longer than any file name", "convert the model again")
    path = folder / name
    if not resolves_inside(path, folder):
        raise InvalidModelFileError(f"{what} {name[:80]!r} is a link to a file outside the folder", _HINT)
    return path


def check_no_escaping_links(folder: Path) -> None:
    """Refuse a folder holding a link that leads outside it (a runtime may read any file in it)."""
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(parent) / name
            if path.is_symlink() and not resolves_inside(path, folder):
                raise InvalidModelFileError(f"{path}: a link to {os.readlink(path)!r}, outside the model folder",
                                            _HINT)
