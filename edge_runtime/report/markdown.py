"""The Markdown report: the same sections and tables as the HTML page, plots as PNG files beside it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_runtime.report.anatomy import anatomy_table
from edge_runtime.report.tables import artifact_tables, device_table, fleet_table, recommendation_line

if TYPE_CHECKING:
    from edge_runtime.report.plots import Plot
    from edge_runtime.report.tables import Report, Table


def _cell(text: str) -> str:
    # A pipe would end the cell and a newline the row.
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> list[str]:
    """A GitHub-flavoured Markdown table with its title and caption."""
    lines = [f"### {_cell(table.title)}", ""]
    headers = table.headers if any(table.headers) else ("", "")
    lines.append("| " + " | ".join(_cell(h) for h in headers) + " |")
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if table.caption:
        lines += ["", _cell(table.caption)]
    return lines + [""]


def _image(plot: Plot) -> list[str]:
    return [f"![{_cell(plot.title)}]({plot.name}.png)", ""]


def render_markdown(report: Report, plots: list[Plot]) -> str:
    """The whole report as Markdown."""
    lines = ["# edge-runtime device report", "",
             f"{len(report.runs)} device run(s) · generated {report.created}", ""]
    fleet = fleet_table(report)
    if fleet is not None:
        lines += ["## Fleet", ""] + table_markdown(fleet)
        lines += [line for p in plots if p.name == "fleet" for line in _image(p)]
    lines += ["## Quality against size", ""]
    quality = [p for p in plots if p.name == "quality"]
    if quality:
        lines += _image(quality[0])
        lines += ["The line joins the Pareto front: no other artifact is both smaller and better.", ""]
    else:
        lines += ["No quality figures: the benchmarked artifacts carry no manifest with quality measurements "
                  "(`edgert convert` writes them).", ""]
    for run in report.runs:
        lines += [f"## {_cell(run.label)}", ""] + table_markdown(device_table(run))
        lines += [f"**Planner's recommendation:** {_cell(recommendation_line(run.result))}", ""]
        plan = run.result.recommendation or {}
        lines += [f"- {_cell(reason)}" for reason in plan.get("reasons") or []]
        floor = run.floor
        lines += ["", f"**Profile floor** ({_cell(floor.what)}): **{floor.status}** — {_cell(floor.why)}", ""]
        lines += [line for p in plots if p.device == run.label for line in _image(p)]
        for table in artifact_tables(run):
            lines += table_markdown(table)
        anatomy = anatomy_table(run)
        if anatomy is not None:
            lines += table_markdown(anatomy)
        for skip in run.result.skipped:
            lines.append(f"- skipped {_cell(str(skip.get('artifact')))} ({_cell(str(skip.get('backend')))}): "
                         f"{_cell(str(skip.get('why')))}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
