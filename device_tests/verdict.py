"""The suite's verdict: what was checked, what passed, what failed and what could not be checked.

pytest's own output lists test names and tracebacks; a person setting up a device wants a few
lines instead. Each check is named by its test's docstring (first line); a passed check may add
what it measured (``record_property("verdict", ...)``), a failed one says its assertion message
(the measured and expected figures), a skipped one why it could not run here. ``conftest.py``
collects the outcomes, prints the verdict at the end of the run and writes ``verdict.md`` into the
output folder, the first file to read there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATUSES = ("failed", "passed", "not checked")  # the verdict's order: what needs attention first


@dataclass(frozen=True)
class CheckOutcome:
    """One check of the suite and how it went."""

    check: str  # "Decode reaches the floor of the profile's class"
    status: str  # one of STATUSES
    detail: str  # measured figures, the failure's message, or why it could not be checked


def check_title(item: Any) -> str:
    """What a test checks, in words: its docstring's first line, else its name."""
    doc = (getattr(getattr(item, "function", None), "__doc__", None) or "").strip()
    if doc:
        return doc.splitlines()[0].rstrip(".")
    return item.name.removeprefix("test_").replace("_", " ").capitalize()


def outcome_of(title: str, report: Any, previous: CheckOutcome | None) -> CheckOutcome | None:
    """The check's outcome after one phase's report (setup, call, teardown), or None when unchanged."""
    if previous is not None and previous.status != "passed":
        return None  # a failed or skipped setup/call keeps its reason
    if report.skipped:
        return CheckOutcome(title, "not checked", _skip_reason(report.longrepr))
    if report.failed:
        return CheckOutcome(title, "failed", _failure_message(report))
    if report.when == "call":
        notes = [str(v) for k, v in getattr(report, "user_properties", ()) if k == "verdict"]
        return CheckOutcome(title, "passed", "; ".join(notes))
    return None


def format_verdict(outcomes: list[CheckOutcome], device: str = "") -> str:
    """The verdict as Markdown: a headline, then the checks grouped failed, passed, not checked."""
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    if not outcomes:
        headline = "no check ran"
    elif counts["failed"]:
        headline = f"this device does NOT pass: {counts['failed']} of {len(outcomes)} checks failed"
    else:
        headline = f"this device passes every check that could run here ({counts['passed']} of {len(outcomes)})"
    lines = [f"# edgert device-test{': ' + device if device else ''}", "", f"**Verdict: {headline}.**"]
    for status in STATUSES:
        group = [o for o in outcomes if o.status == status]
        if group:
            lines += ["", f"## {status.capitalize()} ({len(group)})", ""]
            lines += [f"- {o.check}" + (f": {o.detail}" if o.detail else "") for o in group]
    return "\n".join(lines) + "\n"


def write_verdict(text: str, out: Path) -> Path:
    """Write ``verdict.md`` into the suite's output folder."""
    from edge_runtime.files import atomic_write

    return atomic_write(out / "verdict.md", text)


def _skip_reason(longrepr: Any) -> str:
    # A skip's longrepr is (file, line, "Skipped: reason").
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return str(text).removeprefix("Skipped: ").strip()


def _failure_message(report: Any) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    text = text.split("\nassert ")[0]  # pytest's rewritten expression adds nothing to the message
    for prefix in ("AssertionError: ", "Failed: "):
        text = text.removeprefix(prefix)
    phase = "" if report.when == "call" else f"(in {report.when}) "
    return phase + " ".join(line.strip() for line in text.strip().splitlines()[:6])
