"""Where the model store and the runtime's caches live: ``$EDGERT_HOME`` or the platform's user
data folder."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The model store folder: ``$EDGERT_HOME`` or the platform's user data folder."""
    override = os.environ.get("EDGERT_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edge-runtime", appauthor=False))


def store_root() -> Path:
    """``home()/models``: one folder per stored model name."""
    return home() / "models"
