"""What commands print besides their tables: JSON documents on stdout, progress rows on stderr."""

from __future__ import annotations

import json
from typing import Any

import click


def print_json(data: Any) -> None:
    """One JSON document on stdout (what ``--json`` prints)."""
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


class ProgressRows:
    """One rich row per label (description, bar, note, elapsed time) on stderr, while the block runs.

    The one progress display of ``bench``, ``convert`` and ``eval``: each turns its library's
    progress callback into ``show`` calls. Data goes to stdout, so rows never mix with what a
    script reads.
    """

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24),
                                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                                  console=Console(stderr=True))
        self._rows: dict[str, Any] = {}

    def __enter__(self) -> ProgressRows:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rows:
            self._progress.stop()
            return
        # Off a terminal, stopping prints the final display and ends its line: with no rows yet,
        # an empty line before the error message. Nothing was shown, so nothing is printed.
        self._progress.live.transient = True
        self._progress.live.stop()

    def show(self, label: str, done: float, total: float | None, note: str = "") -> None:
        """Set the row ``label`` (added on first use) to ``done`` of ``total`` (None: not known yet)."""
        if label not in self._rows:
            self._rows[label] = self._progress.add_task(label, total=total, note=note)
        self._progress.update(self._rows[label], completed=done, total=total, note=note)
