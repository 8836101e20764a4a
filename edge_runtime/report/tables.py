"""What a report shows, worked out from bench results: the per-device summary and tables, the
recommendation and floor checks, and the fleet table (``__init__.write_report`` renders them).

``build_report`` reads and checks the files (``bench.schema.load_runs``) and works out what every
output shows: per device the summary, one table per artifact, the planner's recommendation and
the profile's decode floor; across devices the fleet table. ``write_report`` renders it:
``report.html`` (self-contained: plots as base64 PNG data URIs, styles inline, nothing fetched),
``report.md`` with the plots as PNG files beside it, and ``report.json`` (every run, plus the
summary; ``edgert report`` reads it back). matplotlib is imported only when plots are drawn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.bench.result import ArtifactResult, BenchResult
from edge_runtime.bench.schema import SCHEMA_VERSION, load_runs
from edge_runtime.errors import InvalidConfigError
from edge_runtime.planning.floor import DecodeFloor, decode_floor

GIB, MIB = 1 << 30, 1 << 20
# Quality figures a manifest may carry, in the order the quality plot prefers them.
QUALITY_METRICS = (
    ("KL divergence", ("kld_mean", "kld", "mean_kld", "kl_divergence"), True),
    ("perplexity", ("ppl", "perplexity"), True),
    ("top-1 agreement", ("top1", "top1_agreement", "top_1"), False),
)


@dataclass(frozen=True)
class Table:
    """A table both renderers draw: a title, a header row and rows of preformatted cells."""

    title: str
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class FloorCheck:
    """Whether a device reaches its profile's decode floor with every artifact it benchmarked."""

    status: str  # "meets", "below", "not measured"
    floor_tok_s: float | None  # of the artifact furthest below (or least above) its floor
    measured_tok_s: float | None  # ... and what it measured
    what: str  # "SmolLM2-135M-Instruct Q4_1 ≥ 50.0 tok/s"
    why: str  # the measured and expected figures, how the floor follows, what could not be checked
    artifacts: tuple[dict[str, Any], ...] = ()  # per artifact × backend: label, measured and floor

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceRun:
    """One bench run, with what the report derives from it."""

    label: str
    result: BenchResult
    floor: FloorCheck


@dataclass(frozen=True)
class Report:
    """Everything the three outputs show."""

    runs: tuple[DeviceRun, ...]
    sources: tuple[dict[str, Any], ...]  # the documents as read, for report.json
    created: str

    def summary(self) -> list[dict[str, Any]]:
        """Per device: label, profile, floor, recommendation and the headline figures."""
        return [{
            "device": run.label,
            "profile": (run.result.profile or {}).get("id"),
            "floor": run.floor.to_dict(),
            "recommendation": recommendation_line(run.result),
            "results": [{
                "artifact": r.label, "backend": r.backend, "threads": r.threads,
                "decode_tok_s": r.decode_tok_s, "prefill_tok_s": r.prefill_tok_s, "ttft_ms": r.ttft_ms,
                "peak_rss_bytes": r.peak_rss_bytes, "decode_ceiling_tok_s": r.decode_ceiling_tok_s,
                "efficiency": (r.roofline or {}).get("efficiency"), "quality": r.artifact.get("quality"),
            } for r in run.result.results],
        } for run in self.runs]

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": "edgert-report", "created": self.created,
                "summary": self.summary(), "runs": list(self.sources)}


def build_report(paths: list[str | Path]) -> Report:
    """Read every file (bench results, fleet files, earlier report.json) into one report."""
    if not paths:
        raise InvalidConfigError("no result files given", "edgert report RESULT.json... --out DIR")
    sources: list[dict[str, Any]] = []
    for path in paths:
        sources += load_runs(path)
    runs, seen = [], {}
    for doc in sources:
        result = BenchResult.from_dict(doc)
        label = device_label(result.device)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # two runs of one machine stay apart in the fleet view
            label = f"{label} ({result.created or seen[label]})"
        runs.append(DeviceRun(label, result, floor_check(result)))
    return Report(tuple(runs), tuple(sources), datetime.now(timezone.utc).isoformat(timespec="seconds"))


def device_label(device: dict[str, Any]) -> str:
    """A short name for a device: its board, else its CPU."""
    board = (device.get("board") or {}).get("model")
    cpu = (device.get("cpu") or {}).get("model")
    return str(board or cpu or "unknown device").strip()


def floor_check(result: BenchResult) -> FloorCheck:
    """Each benchmarked artifact (its best thread count) against its floor on the profile's class."""
    data = (result.profile or {}).get("floor")
    if not data:
        return FloorCheck("not measured", None, None, "no profile floor", "the result names no device profile")
    floor = DecodeFloor.from_dict(data)
    best: dict[tuple[str, str], ArtifactResult] = {}
    for r in result.results:
        key = (str(r.artifact.get("path")), r.backend)
        if key not in best or r.decode_tok_s > best[key].decode_tok_s:
            best[key] = r
    checked, unknown = [], []
    missing = "its bytes read per token are unknown" if floor.has_figures else "the profile states no class figures"
    for r in best.values():
        estimate = decode_floor(floor, bytes_per_token=(r.roofline or {}).get("bytes_per_token")
                                or r.artifact.get("size_bytes"),
                                n_params=r.artifact.get("n_params") or (r.model or {}).get("n_params"),
                                name=str(r.artifact.get("name") or ""), path=str(r.artifact.get("path") or ""),
                                quant=r.artifact.get("quant"))
        if estimate is None:
            unknown.append(f"{r.label}: no floor ({missing})")
        else:
            checked.append((r, estimate))
    if not checked:
        return FloorCheck("not measured", None, None, floor.summary, "; ".join(unknown) or "nothing was benchmarked")
    worst, worst_floor = min(checked, key=lambda c: c[0].decode_tok_s / c[1].tok_s)
    status = "meets" if all(r.decode_tok_s >= e.tok_s for r, e in checked) else "below"
    what = (f"{worst.label} ≥ {worst_floor.tok_s:.1f} tok/s" if len(checked) == 1
            else f"{len(checked)} artifacts, each ≥ its floor ({floor.summary})")
    why = [f"{r.label} on {r.backend} ({r.threads} threads): measured {r.decode_tok_s:.1f} tok/s, floor "
           f"{e.tok_s:.1f} = {e.how}" for r, e in checked]
    cpus = (result.device.get("cpu") or {}).get("logical_cores")
    busy = [(r, (r.load_average or {}).get("before")) for r, _ in checked]
    busy = [(r, load) for r, load in busy if isinstance(load, (int, float)) and cpus and load > cpus / 2]
    if busy:  # threads that spin on a barrier slow down many times over when the cores are shared
        why.append("the device was busy: load average " + ", ".join(f"{load:.1f}" for _, load in busy)
                   + f" on {cpus} logical CPUs before decode was measured; the floor is for an idle device, "
                     "so measure again when it is idle")
    cores = (result.device.get("cpu") or {}).get("physical_cores") or cpus
    if floor.processor == "cpu" and floor.cores and isinstance(cores, int) and cores < floor.cores:
        why.append(f"this device has {cores} cores, a healthy device of its class {floor.cores} (fewer cores "
                   "draw less of the memory bandwidth than the class's figures assume)")
    measured_gbs = result.memory_bandwidth.get("gbs")
    if floor.processor == "cpu" and floor.bandwidth_gbs and isinstance(measured_gbs, (int, float)):
        why.append(f"this device reads {measured_gbs:.1f} GB/s, a healthy device of its class "
                   f"{floor.bandwidth_gbs:g} GB/s")
    if floor.processor == "gpu" and any(not r.settings.get("n_gpu_layers") for r, _ in checked):
        why.append("no layers ran on the GPU, which the profile's figures describe (install llama.cpp with GPU "
                   "support to reach them)")
    artifacts = tuple({"artifact": r.label, "backend": r.backend, "threads": r.threads,
                       "measured_tok_s": r.decode_tok_s, "floor_tok_s": e.tok_s, "bound": e.bound, "how": e.how}
                      for r, e in checked)
    return FloorCheck(status, worst_floor.tok_s, worst.decode_tok_s, what, "; ".join(why + unknown), artifacts)


def recommendation_line(result: BenchResult) -> str:
    """The planner's choice among the benchmarked artifacts, and its measured speed."""
    plan = result.recommendation
    if not plan:
        return "no recommendation recorded"
    if "error" in plan:
        return f"the planner found nothing to run: {plan['error']}"
    artifact = plan.get("artifact") or {}
    label = f"{artifact.get('name', '?')} {artifact.get('quant') or ''}".strip()
    settings = plan.get("settings") or {}
    line = (f"{label} on {plan.get('backend')} · {settings.get('n_threads', '?')} threads · "
            f"ctx {settings.get('n_ctx', '?')} · GPU layers {settings.get('n_gpu_layers', 0)}")
    measured = [r for r in result.results
                if r.artifact.get("path") == artifact.get("path") and r.backend == plan.get("backend")]
    if measured:
        line += f" · measured {max(r.decode_tok_s for r in measured):.1f} tok/s decode"
    return line


def quality_metric(quality: dict[str, Any] | None) -> tuple[str, float, bool] | None:
    """(name, value, lower is better) of the preferred quality figure, or None."""
    if not quality:
        return None
    lowered = {str(k).lower(): v for k, v in quality.items()}
    for name, keys, lower_better in QUALITY_METRICS:
        for key in keys:
            value = lowered.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return name, float(value), lower_better
    return None


def pareto_front(points: list[tuple[float, float]], lower_better: bool) -> list[int]:
    """Indices of the (size, quality) points no other point beats on both (smaller, better)."""
    def better_or_equal(a: float, b: float) -> bool:
        return a <= b if lower_better else a >= b

    front = []
    for i, (size, q) in enumerate(points):
        dominated = any(
            s <= size and better_or_equal(oq, q) and (s < size or oq != q)
            for j, (s, oq) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


# --- tables ----------------------------------------------------------------------------------


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "—"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.0f} MiB"


def fmt_num(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def quality_text(quality: dict[str, Any] | None) -> str:
    """The manifest's quality figures in a few words (``edgert convert``'s keys first)."""
    if not quality:
        return "— (no manifest)"

    def number(key: str) -> float | None:
        value = quality.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    parts = []
    if (ppl := number("ppl")) is not None:
        delta = number("delta_ppl_pct")
        parts.append(f"ppl {ppl:.2f}" + (f" ({delta:+.1f}%)" if delta is not None else ""))
    if (kld := number("kld_mean")) is not None:
        parts.append(f"KLD {kld:.4f}")
    if (top1 := number("top1_agreement")) is not None:
        parts.append(f"top-1 {top1:.1%}")
    if not parts:  # figures under other names (a hand-written manifest)
        parts = [f"{k} {v:.4g}" for k, v in quality.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return " · ".join(parts) or "—"


def device_table(run: DeviceRun) -> Table:
    """The device summary: hardware, profile, bandwidth and the method."""
    d, r, m = run.result.device, run.result, run.result.method
    cpu, mem = d.get("cpu") or {}, d.get("memory") or {}
    gpus = ", ".join(f"{g.get('name')} ({fmt_bytes(g.get('memory_total_bytes'))})"
                     for g in d.get("gpus") or []) or "none"
    osinfo, bw, profile = d.get("os") or {}, r.memory_bandwidth, r.profile or {}
    rows = [
        ("CPU", f"{cpu.get('model') or '?'} · {cpu.get('arch') or '?'} · {cpu.get('physical_cores') or '?'} cores "
                f"({cpu.get('logical_cores') or '?'} threads)"),
        ("SIMD", " ".join(cpu.get("flags") or []) or "—"),
        ("Memory", f"{fmt_bytes(mem.get('total_bytes'))} total · {fmt_bytes(mem.get('available_bytes'))} available"),
        ("GPU", gpus),
        ("Board", (d.get("board") or {}).get("model") or "—"),
        ("OS", f"{osinfo.get('distro') or osinfo.get('system') or '?'} · Python {osinfo.get('python') or '?'}"),
        ("Profile", f"{profile.get('id', '—')}: {profile.get('description', '')}"),
        ("Read bandwidth", f"{bw.get('gbs', 0):.1f} GB/s ({bw.get('threads', '?')} threads, "
                           f"{fmt_bytes(bw.get('buffer_bytes'))} buffer)"),
        ("Method", f"{m.reps} reps after {m.warmup} warm-up · prompts {', '.join(map(str, m.prompt_tokens))} tokens "
                   f"· decode {m.gen_tokens} tokens after {m.decode_prompt_tokens} · {m.sampling} · "
                   f"prompt text: {m.prompt_source}"),
        ("Measured", f"{r.created} · edgert {r.edgert_version}"),
    ]
    return Table("Device", ("", ""), tuple(rows))


def artifact_tables(run: DeviceRun) -> list[Table]:
    """One table per artifact; a row per backend × threads."""
    by_path: dict[str, list[ArtifactResult]] = {}
    for r in run.result.results:
        by_path.setdefault(str(r.artifact.get("path")), []).append(r)
    prompts = run.result.method.prompt_tokens
    headers = ("Backend", "Threads", "Decode tok/s", f"Prefill tok/s ({prompts[-1]})",
               *(f"TTFT ms @{n}" for n in prompts), "Load s", "Peak RSS (est.)", "Ceiling tok/s",
               "Efficiency", "Energy J/tok", "CPU °C")
    tables = []
    for results in by_path.values():
        first = results[0]
        rows = []
        for r in results:
            roof, energy, temp = r.roofline or {}, r.energy or {}, r.temperature_c or {}
            eff = roof.get("efficiency")
            rows.append((
                r.backend, str(r.threads), f"{r.decode_tok_s:.1f} ± {r.decode_tok_s_sd:.1f}",
                f"{r.prefill_tok_s:.1f} ± {r.prefill_tok_s_sd:.1f}",
                *(fmt_num(r.ttft_ms.get(str(n))) for n in prompts), fmt_num(r.load_s, ".2f"),
                f"{fmt_bytes(r.peak_rss_bytes)} ({fmt_bytes(r.estimated_memory_bytes)})",
                fmt_num(r.decode_ceiling_tok_s), "—" if eff is None else f"{eff:.0%}",
                fmt_num(energy.get("decode_j_per_token"), ".3f") if energy.get("available") else "n/a",
                f"{fmt_num(temp.get('before'))} → {fmt_num(temp.get('after'))}",
            ))
        a = first.artifact
        caption = f"{a.get('format')} · {fmt_bytes(a.get('size_bytes'))} · quality: {quality_text(a.get('quality'))}"
        if first.roofline:
            caption += f" · {fmt_bytes(first.roofline.get('bytes_per_token'))} read per token"
        notes = sorted({n for r in results for n in r.notes})
        if notes:
            caption += " · notes: " + "; ".join(notes)
        tables.append(Table(first.label, headers, tuple(rows), caption))
    return tables


def fleet_table(report: Report) -> Table | None:
    """Decode tok/s (and roofline efficiency) of each artifact on each device."""
    if len(report.runs) < 2:
        return None
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str], str] = {}
    for run in report.runs:
        for r in run.result.results:
            key = (r.label, r.backend)
            if key not in keys:
                keys.append(key)
            eff = (r.roofline or {}).get("efficiency")
            text = f"{r.decode_tok_s:.1f}" + (f" ({eff:.0%})" if eff is not None else "")
            previous = cells.get((*key, run.label))
            cells[(*key, run.label)] = text if previous is None else f"{previous} / {text}"
    rows = [(f"{label} · {backend}", *(cells.get((label, backend, run.label), "—") for run in report.runs))
            for label, backend in keys]
    rows.append(("profile floor", *(f"{run.floor.status} ({run.floor.what})" for run in report.runs)))
    return Table("Fleet: decode tok/s (roofline efficiency)", ("Artifact · backend", *(r.label for r in report.runs)),
                 tuple(rows))
