"""The report's plots, drawn with matplotlib's Agg canvas into PNG bytes.

No pyplot: a ``Figure`` on a ``FigureCanvasAgg`` keeps no global state and needs no display, so
drawing works the same on a headless Pi, in a server and in tests. PNG metadata is dropped
(matplotlib would write its URL into it), so nothing in the report points anywhere.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.report.tables import pareto_front, quality_metric

if TYPE_CHECKING:
    from edge_runtime.report.tables import Report

MIB = 1 << 20


@dataclass(frozen=True)
class Plot:
    """One picture of the report."""

    name: str  # file stem: "decode-1", "quality", "fleet"
    title: str
    png: bytes
    device: str | None = None  # the device section it belongs to; None: the whole report


def _figure(width: float = 7.5, height: float = 3.8) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise EdgeRuntimeError("edgert report draws its plots with matplotlib, which is not installed",
                               'pip install "edge-runtime[report]"') from exc
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def draw_plots(report: Report) -> list[Plot]:
    """Every plot the report shows: per device, then quality and the fleet."""
    plots: list[Plot] = []
    for i, run in enumerate(report.runs, start=1):
        if run.result.results:
            plots.append(Plot(f"decode-{i}", f"Decode tokens/s — {run.label}", decode_plot(run), run.label))
            plots.append(Plot(f"ttft-{i}", f"Time to first token — {run.label}", ttft_plot(run), run.label))
        anatomy = anatomy_plot(run)
        if anatomy is not None:
            plots.append(Plot(f"anatomy-{i}", f"Where one reply's time goes — {run.label}", anatomy, run.label))
    quality = quality_plot(report)
    if quality is not None:
        plots.append(Plot("quality", "Quality against size", quality))
    if len(report.runs) > 1:
        plots.append(Plot("fleet", "Decode tokens/s across devices", fleet_plot(report)))
    return plots


def decode_plot(run: Any) -> bytes:
    """Bars of decode tok/s (± sd) per artifact · backend · threads, the roofline as a tick."""
    results = run.result.results
    fig = _figure(7.5, 1.2 + 0.45 * len(results))
    ax = fig.add_subplot()
    labels = [f"{r.label} · {r.backend} · {r.threads}t" for r in results]
    y = list(range(len(results)))
    ax.barh(y, [r.decode_tok_s for r in results], xerr=[r.decode_tok_s_sd for r in results],
            color="#4c78a8", label="measured", capsize=3)
    ceilings = [(i, r.decode_ceiling_tok_s) for i, r in enumerate(results) if r.decode_ceiling_tok_s]
    if ceilings:
        ax.scatter([c for _, c in ceilings], [i for i, _ in ceilings], marker="|", s=400, color="#e45756",
                   label="roofline ceiling", zorder=3)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s")
    ax.set_xlim(left=0)
    fig.legend(loc="outside upper right", ncols=2, fontsize="small")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def anatomy_plot(run: Any) -> bytes | None:
    """Stacked bars of one reply's load, prefill, decode and transfer, for a short and a long prompt."""
    from edge_runtime.report.anatomy import TERMS, replies

    bars = replies(run)
    if not bars:
        return None
    fig = _figure(7.5, 1.4 + 0.45 * len(bars))
    ax = fig.add_subplot()
    y = list(range(len(bars)))
    left = [0.0] * len(bars)
    for term, color in zip(TERMS, ("#9d755d", "#4c78a8", "#f58518", "#54a24b"), strict=True):
        widths = [terms[term] for _, _, terms in bars]
        ax.barh(y, widths, left=left, color=color, label=term)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_yticks(y, [f"{label} · {prompt}" for label, prompt, _ in bars])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside upper right", ncols=4, fontsize="small")
    return _png(fig)


def ttft_plot(run: Any) -> bytes:
    """Time to first token against prompt length, one line per result."""
    fig = _figure()
    ax = fig.add_subplot()
    lengths: set[int] = set()
    for r in run.result.results:
        points = sorted((int(n), ms) for n, ms in r.ttft_ms.items())
        lengths.update(p for p, _ in points)
        ax.plot([p for p, _ in points], [ms for _, ms in points], marker="o",
                label=f"{r.label} · {r.backend} · {r.threads}t")
    # Prompt lengths usually double or quadruple: a log axis spaces them evenly.
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(lengths), [str(n) for n in sorted(lengths)])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("time to first token (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def quality_plot(report: Report) -> bytes | None:
    """Quality figure against artifact size, the Pareto front joined; None without figures."""
    seen: dict[str, tuple[str, float, float]] = {}
    metric: tuple[str, bool] | None = None
    for run in report.runs:
        for r in run.result.results:
            found = quality_metric(r.artifact.get("quality"))
            size = r.artifact.get("size_bytes")
            if found is None or not size:
                continue
            if metric is None:
                metric = (found[0], found[2])
            if found[0] == metric[0]:
                seen[str(r.artifact.get("path"))] = (r.label, size / MIB, found[1])
    if metric is None or not seen:
        return None
    points = list(seen.values())
    front = pareto_front([(s, q) for _, s, q in points], lower_better=metric[1])
    fig = _figure()
    ax = fig.add_subplot()
    ax.scatter([s for _, s, _ in points], [q for _, _, q in points], color="#4c78a8", zorder=3)
    for label, s, q in points:
        ax.annotate(label, (s, q), textcoords="offset points", xytext=(4, 4), fontsize="small")
    ax.plot([points[i][1] for i in front], [points[i][2] for i in front], color="#e45756",
            drawstyle="steps-post", label="Pareto front")
    ax.margins(x=0.2, y=0.1)  # room for the labels beside the points
    ax.set_xlabel("size (MiB)")
    ax.set_ylabel(f"{metric[0]} ({'lower' if metric[1] else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def fleet_plot(report: Report) -> bytes:
    """Grouped bars: decode tok/s of each artifact · backend, one bar per device."""
    keys: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for run in report.runs:
        for r in run.result.results:
            key = f"{r.label} · {r.backend}"
            if key not in keys:
                keys.append(key)
            values[(key, run.label)] = max(values.get((key, run.label), 0.0), r.decode_tok_s)
    fig = _figure(7.5, 1.5 + 0.5 * len(keys) * max(1, len(report.runs)) / 2)
    ax = fig.add_subplot()
    width = 0.8 / len(report.runs)
    for j, run in enumerate(report.runs):
        ax.barh([i + j * width for i in range(len(keys))], [values.get((k, run.label), 0.0) for k in keys],
                height=width, label=run.label)
    ax.set_yticks([i + width * (len(report.runs) - 1) / 2 for i in range(len(keys))], keys)
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside upper right", ncols=min(3, len(report.runs)), fontsize="small")
    return _png(fig)
