"""`edgert report`: HTML, Markdown and JSON from a real bench result and from a hand-made fleet."""

from __future__ import annotations

import copy
import json
import re
import subprocess

import pytest

from edge_runtime.bench.schema import load_runs
from edge_runtime.errors import InvalidConfigError
from edge_runtime.report.tables import build_report, floor_check, pareto_front, quality_metric


def edgert(cmd, *args, timeout=300):
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_file(edgert_cmd, tmp_path_factory):
    """A real result: `edgert bench --json` alone prints the document on stdout."""
    proc = edgert(edgert_cmd, "bench", "--prompt-tokens", "8,16", "--gen-tokens", "4", "--reps", "1",
                  "--warmup", "0", "--threads", "2", "--bandwidth-mib", "32", "--json")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path_factory.mktemp("result") / "bench.json"
    path.write_text(proc.stdout)
    return path


def hand_made_run(board: str, profile: str, floor_model: str, rows: list[tuple[str, str, int, float, dict | None]]):
    """A bench document written by hand: one device, one result per (name, quant, size, tok/s, quality)."""
    results = []
    for name, quant, size, tok_s, quality in rows:
        results.append({
            "artifact": {"path": f"/models/{name}-{quant}.gguf", "format": "gguf", "name": name, "quant": quant,
                         "size_bytes": size, "quality": quality},
            "backend": "llama.cpp", "threads": 4, "settings": {"n_ctx": 2048},
            "decode_tok_s": tok_s, "decode_tok_s_sd": 0.4, "prefill_tok_s": tok_s * 8, "prefill_tok_s_sd": 2.0,
            "ttft_ms": {"32": 120.0, "128": 400.0}, "load_s": 0.8, "peak_rss_bytes": size + (200 << 20),
            "memory_bandwidth_gbs": 12.0, "decode_ceiling_tok_s": 12e9 / size,
            "roofline": {"bandwidth_bytes_s": 12e9, "bytes_per_token": size, "ceiling_tok_s": 12e9 / size,
                         "efficiency": tok_s / (12e9 / size)},
            "samples": [{"rep": 0, "warmup": False, "kind": "decode", "prompt_tokens": 32, "gen_tokens": 64,
                         "ttft_ms": 120.0, "prefill_tok_s": tok_s * 8, "decode_tok_s": tok_s}],
        })
    return {
        "schema_version": 1, "kind": "edgert-bench", "created": "2025-01-01T00:00:00+00:00",
        "device": {"cpu": {"model": "Cortex-A76", "arch": "aarch64", "physical_cores": 4, "logical_cores": 4},
                   "memory": {"total_bytes": 8 << 30, "available_bytes": 6 << 30}, "board": {"model": board}},
        "profile": {"id": profile, "floor": {"model": floor_model, "format": "gguf", "quant": "Q4_0",
                                             "decode_tok_s": 8.0, "n_ctx": 2048, "source": "test"}},
        "method": {"reps": 3, "warmup": 1, "threads": [4], "prompt_tokens": [32, 128], "gen_tokens": 64},
        "memory_bandwidth": {"bytes_s": 12e9, "gbs": 12.0},
        "results": results,
    }


@pytest.fixture
def fleet_file(tmp_path):
    # The keys `edgert convert` writes into a manifest's quality figures.
    quality = {q: {"ppl": ppl, "delta_ppl_pct": (ppl / 14.21 - 1) * 100, "kld_mean": kld, "top1_agreement": top1}
               for q, ppl, kld, top1 in (("Q8_0", 14.23, 0.0004, 0.991), ("Q4_K_M", 14.9, 0.031, 0.932),
                                          ("Q4_0", 15.4, 0.052, 0.908), ("Q3_K_M", 16.0, 0.09, 0.87))}
    sizes = {"Q8_0": 1300 << 20, "Q4_K_M": 800 << 20, "Q4_0": 750 << 20, "Q3_K_M": 820 << 20}
    rows = [("Llama-3.2-1B-Instruct", q, sizes[q], 9.5 * 750 / (sizes[q] >> 20), quality[q]) for q in sizes]
    pi = hand_made_run("Raspberry Pi 5 Model B Rev 1.0", "raspberry-pi-5-8gb", "Llama-3.2-1B-Instruct", rows)
    jetson = hand_made_run("NVIDIA Jetson Orin Nano <Developer Kit>", "jetson-orin-nano-8gb", "Llama-3.1-8B-Instruct",
                           [("Llama-3.2-1B-Instruct", "Q4_0", sizes["Q4_0"], 30.0, quality["Q4_0"])])
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({"schema_version": 1, "kind": "edgert-fleet", "runs": [pi, jetson]}))
    return path


def check_outputs(out):
    """The three files exist; the HTML is self-contained and holds tables and inline images."""
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    assert html.count("<table>") >= 2 and "<th>Decode tok/s</th>" in html
    images = re.findall(r'<img [^>]*src="([^"]*)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert "| Decode tok/s |" in md
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / name).is_file()
    assert load_runs(out / "report.json")  # report.json reads back as a collection of runs
    return html, md


def test_report_renders_from_a_real_bench_result(edgert_cmd, bench_file, tmp_path):
    out = tmp_path / "report"
    proc = edgert(edgert_cmd, "report", str(bench_file), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "floor" in proc.stdout and "SmolLM2-135M-Instruct Q4_1" in proc.stdout
    html, md = check_outputs(out)
    assert "SmolLM2-135M-Instruct Q4_1" in html and "Planner's recommendation" in html
    assert "No quality figures" in md and "TTFT ms @16" in md
    again = tmp_path / "again"
    assert edgert(edgert_cmd, "report", str(out / "report.json"), "--out", str(again)).returncode == 0
    runs = [json.loads((d / "report.json").read_text())["runs"] for d in (out, again)]
    assert runs[0] == runs[1]


def test_report_renders_a_two_device_fleet(fleet_file, bench_file, tmp_path):
    from edge_runtime.report import write_report

    report = build_report([fleet_file, bench_file])
    assert len(report.runs) == 3
    written = {p.name for p in write_report(report, tmp_path)}
    assert {"fleet.png", "quality.png", "report.html", "report.md", "report.json"} <= written
    html, md = check_outputs(tmp_path)
    assert "<h2>Fleet</h2>" in html and "## Fleet" in md
    assert "Raspberry Pi 5 Model B Rev 1.0" in html
    assert "NVIDIA Jetson Orin Nano &lt;Developer Kit&gt;" in html and "<Developer Kit>" not in html
    assert "ppl 14.90 (+4.9%) · KLD 0.0310 · top-1 93.2%" in md and "Pareto front" in md
    summary = json.loads((tmp_path / "report.json").read_text())["summary"]
    assert [s["floor"]["status"] for s in summary[:2]] == ["meets", "not measured"]


def test_floor_check_compares_the_floor_model_only(fleet_file):
    from edge_runtime.bench.runner import BenchResult

    pi, _ = load_runs(fleet_file)
    check = floor_check(BenchResult.from_dict(pi))
    assert check.status == "meets" and check.measured_tok_s == pytest.approx(9.5)
    slow = copy.deepcopy(pi)
    for r in slow["results"]:
        r["decode_tok_s"] = 5.0
    assert floor_check(BenchResult.from_dict(slow)).status == "below"
    assert not any("busy" in line for line in floor_check(BenchResult.from_dict(slow)).why.split("; "))
    busy = copy.deepcopy(slow)
    busy["device"]["cpu"]["logical_cores"] = 4
    for r in busy["results"]:
        r["load_average"] = {"before": 9.1, "after": 9.4}
    why = floor_check(BenchResult.from_dict(busy)).why
    assert "the device was busy: load average 9.1" in why and "on 4 logical CPUs" in why
    # Class figures (a Pi 5's): a device with fewer cores than its class is told so.
    classed = copy.deepcopy(slow)
    classed["profile"]["floor"] = {"bandwidth_gbs": 9.0, "compute_gflops": 75.0, "min_token_ms": 12.0,
                                   "efficiency": 0.6, "cores": 4, "core_class": "Cortex-A76", "processor": "cpu",
                                   "source": "test"}
    classed["device"]["cpu"].update(physical_cores=4, logical_cores=4)
    assert "cores, a healthy device of its class" not in floor_check(BenchResult.from_dict(classed)).why
    classed["device"]["cpu"].update(physical_cores=2, logical_cores=2)
    assert "this device has 2 cores, a healthy device of its class 4" in floor_check(BenchResult.from_dict(classed)).why


def test_pareto_front_and_quality_metric():
    # (size, kld): the 3rd is bigger and worse than the 2nd, so off the front.
    points = [(1300.0, 0.0004), (800.0, 0.031), (820.0, 0.09), (750.0, 0.052)]
    assert pareto_front(points, lower_better=True) == [3, 1, 0]
    assert pareto_front([(1.0, 0.9), (2.0, 0.8)], lower_better=False) == [0]
    assert quality_metric({"PPL": 14.2, "top1": 0.9}) == ("perplexity", 14.2, True)
    assert quality_metric({"ppl": 14.9, "kld_mean": 0.031}) == ("KL divergence", 0.031, True)
    assert quality_metric({"note": "none"}) is None


@pytest.mark.parametrize("mangle, message", [
    (lambda text, doc: text[: len(text) // 2], "not valid JSON at line"),
    (lambda text, doc: json.dumps({**doc, "schema_version": 0}), "written by an older edgert (schema version 0"),
    (lambda text, doc: json.dumps({k: v for k, v in doc.items() if k != "schema_version"}), "has no schema_version"),
    (lambda text, doc: json.dumps({**doc, "schema_version": 99}), "written by a newer edgert"),
    (lambda text, doc: json.dumps({**doc, "results": [{"backend": "llama.cpp"}]}), "not a valid bench result"),
    (lambda text, doc: "", "the file is empty"),
])
def test_bad_result_files_are_one_line_errors(edgert_cmd, bench_file, tmp_path, mangle, message):
    text = bench_file.read_text()
    bad = tmp_path / "bad.json"
    bad.write_text(mangle(text, json.loads(text)))
    with pytest.raises(InvalidConfigError, match=re.escape(message)):
        load_runs(bad)
    proc = edgert(edgert_cmd, "report", str(bad), "--out", str(tmp_path / "out"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and message in lines[0] and len(lines) <= 2
    assert not (tmp_path / "out" / "report.html").exists()
