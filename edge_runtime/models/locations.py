"""Where the model store and the runtime's caches live: ``$EDGERT_HOME`` or the platform's user
data folder.

Reading never creates anything: ``home()`` only names the folder (and refuses one that is a
file). A writer asks ``writable_folder`` for the folder it writes into, which creates it and turns
any failure into one line naming ``EDGERT_HOME``.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge_runtime.errors import InvalidConfigError


def home() -> Path:
    """The model store folder: ``$EDGERT_HOME`` or the platform's user data folder."""
    override = os.environ.get("EDGERT_HOME")
    if override:
        folder = Path(override).expanduser()
    else:
        import platformdirs

        folder = Path(platformdirs.user_data_dir("edge-runtime", appauthor=False))
    try:
        usable = folder.is_dir() or not folder.exists()
    except OSError as exc:  # a parent that cannot be searched
        raise _unusable(folder, exc.strerror or str(exc)) from None
    if not usable:
        raise _unusable(folder, "not a folder")
    return folder


def store_root() -> Path:
    """``home()/models``: one folder per stored model name."""
    return home() / "models"


def writable_folder(folder: Path) -> Path:
    """``folder`` (under ``home()``), created if missing, for a writer; an unusable home is one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unusable(folder, exc.strerror or str(exc)) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _unusable(folder, "not writable")
    return folder


def _unusable(folder: Path, why: str) -> InvalidConfigError:
    override = os.environ.get("EDGERT_HOME")
    where = f"EDGERT_HOME={override}" if override else "edgert's data folder"
    return InvalidConfigError(f"{folder}: {why} ({where})",
                              "set EDGERT_HOME to a folder you can write" if not override
                              else "point EDGERT_HOME at a folder you can write, or unset it")
