"""The HTML report: one self-contained page.

Plots are base64 PNG data URIs and the style sheet is inline; there is no script and no link, so
the page opens the same offline, from a USB stick or as a mail attachment. Every string from a
result file is escaped: a device or artifact name is data, never markup.
"""

from __future__ import annotations

import base64
import re
from html import escape
from typing import TYPE_CHECKING

from edge_runtime.report.anatomy import anatomy_table
from edge_runtime.report.tables import artifact_tables, device_table, fleet_table, recommendation_line

if TYPE_CHECKING:
    from edge_runtime.report.plots import Plot
    from edge_runtime.report.tables import Report, Table

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-bottom: .3em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; }
.caption { color: #555; font-size: .92em; margin: 0 0 1.2em; }
.meets { color: #1a7f37; font-weight: 600; } .below { color: #cf222e; font-weight: 600; }
.not-measured { color: #777; font-weight: 600; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: .92em; }
img { max-width: 100%; height: auto; }
"""


def _is_number(text: str) -> bool:
    """Whether a cell is a figure ("12.5 ± 0.3", "62%", "1.2 GiB (1.1 GiB)"), to right-align it."""
    bare = re.sub(r"MiB|GiB|GB/s", "", text)
    return any(c.isdigit() for c in bare) and all(c in "0123456789.,±%()—→-+ " for c in bare)


def table_html(table: Table) -> str:
    """One table with its title and caption."""
    out = [f"<h3>{escape(table.title)}</h3>", "<table>"]
    if any(table.headers):
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in table.headers) + "</tr>")
    for row in table.rows:
        cells = []
        for i, cell in enumerate(row):
            if i == 0 and not any(table.headers):
                cells.append(f"<th>{escape(cell)}</th>")
            else:
                cls = ' class="num"' if _is_number(cell) else ""
                cells.append(f"<td{cls}>{escape(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    if table.caption:
        out.append(f'<p class="caption">{escape(table.caption)}</p>')
    return "\n".join(out)


def figure_html(plot: Plot) -> str:
    """A plot as an inline PNG."""
    data = base64.b64encode(plot.png).decode("ascii")
    return (f'<figure><img alt="{escape(plot.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{escape(plot.title)}</figcaption></figure>")


def render_html(report: Report, plots: list[Plot]) -> str:
    """The whole report as one HTML document."""
    body = ["<h1>edge-runtime device report</h1>",
            f"<p>{len(report.runs)} device run(s) · generated {escape(report.created)}</p>"]
    fleet = fleet_table(report)
    if fleet is not None:
        body += ["<h2>Fleet</h2>", table_html(fleet)]
        body += [figure_html(p) for p in plots if p.name == "fleet"]
    body.append("<h2>Quality against size</h2>")
    quality = [p for p in plots if p.name == "quality"]
    if quality:
        body += [figure_html(quality[0]),
                 "<p>The line joins the Pareto front: no other artifact is both smaller and better.</p>"]
    else:
        body.append("<p>No quality figures: the benchmarked artifacts carry no manifest with quality "
                    "measurements (<code>edgert convert</code> writes them).</p>")
    for run in report.runs:
        body += [f"<h2>{escape(run.label)}</h2>", table_html(device_table(run))]
        body.append(f"<p><strong>Planner's recommendation:</strong> {escape(recommendation_line(run.result))}</p>")
        reasons = (run.result.recommendation or {}).get("reasons") or []
        if reasons:
            body.append("<ul>" + "".join(f"<li>{escape(str(r))}</li>" for r in reasons) + "</ul>")
        floor = run.floor
        css = floor.status.replace(" ", "-")
        body.append(f"<p><strong>Profile floor</strong> ({escape(floor.what)}): "
                    f'<span class="{css}">{escape(floor.status)}</span> — {escape(floor.why)}</p>')
        body += [figure_html(p) for p in plots if p.device == run.label]
        body += [table_html(t) for t in artifact_tables(run)]
        anatomy = anatomy_table(run)
        if anatomy is not None:
            body.append(table_html(anatomy))
        if run.result.skipped:
            body.append("<ul>" + "".join(
                f"<li>skipped {escape(str(s.get('artifact')))} ({escape(str(s.get('backend')))}): "
                f"{escape(str(s.get('why')))}</li>" for s in run.result.skipped) + "</ul>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>edge-runtime device report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
