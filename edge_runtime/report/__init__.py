"""``edgert report``: bench results from one or more devices as HTML, Markdown and JSON.

``tables.build_report`` works out what every output shows; ``write_report`` renders it:
``report.html`` (self-contained: plots as base64 PNG data URIs, styles inline, nothing fetched),
``report.md`` with the plots as PNG files beside it, and ``report.json``. matplotlib is imported
only when plots are drawn.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_runtime.files import atomic_write
from edge_runtime.report.html import render_html
from edge_runtime.report.markdown import render_markdown
from edge_runtime.report.plots import draw_plots
from edge_runtime.report.tables import Report, build_report, recommendation_line

__all__ = ["Report", "build_report", "recommendation_line", "write_report"]


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """Write report.html, report.md (with its PNG plots) and report.json into ``out_dir``."""

    out = Path(out_dir)
    plots = draw_plots(report)
    written = [atomic_write(out / f"{p.name}.png", p.png) for p in plots]
    written.append(atomic_write(out / "report.html", render_html(report, plots)))
    written.append(atomic_write(out / "report.md", render_markdown(report, plots)))
    written.append(atomic_write(out / "report.json", json.dumps(report.to_dict(), indent=1, allow_nan=False) + "\n"))
    return written
