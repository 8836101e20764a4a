"""`edgert bench` on the embedded model with tiny settings: the document, its schema, the roofline."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from edge_runtime.bench.schema import BENCH_SCHEMA, check_bench_document, schema_errors
from edge_runtime.errors import InvalidConfigError

PROMPTS = (8, 16)
TINY = ["--prompt-tokens", ",".join(map(str, PROMPTS)), "--gen-tokens", "4", "--reps", "1", "--warmup", "0",
        "--threads", "2", "--bandwidth-mib", "32"]


def edgert(cmd, *args, timeout=300):
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_run(edgert_cmd, tmp_path_factory):
    """One real `edgert bench --json FILE` run: (process, document)."""
    out = tmp_path_factory.mktemp("bench") / "result.json"
    proc = edgert(edgert_cmd, "bench", "--model", "smollm2", *TINY, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(out.read_text())


def test_document_validates_against_its_schema(bench_run):
    _, doc = bench_run
    assert schema_errors(doc) == []
    check_bench_document(doc)  # raises on any problem
    # The schema is plain JSON Schema: another tool validating with jsonschema agrees.
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(BENCH_SCHEMA)
    assert list(Draft202012Validator(BENCH_SCHEMA).iter_errors(doc)) == []
    assert doc["schema_version"] == 1 and doc["kind"] == "edgert-bench"
    assert doc["method"]["prompt_tokens"] == list(PROMPTS) and doc["method"]["reps"] == 1
    assert doc["method"]["threads"] == [2] and doc["device"]["cpu"]["logical_cores"] >= 1


def test_result_carries_the_interface_keys_and_raw_samples(bench_run):
    _, doc = bench_run
    (result,) = doc["results"]
    assert result["artifact"]["name"] == "SmolLM2-135M-Instruct" and result["backend"] == "llama.cpp"
    assert result["threads"] == 2
    assert result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
    assert result["decode_tok_s_sd"] == 0 and result["prefill_tok_s_sd"] == 0  # one repetition
    assert set(result["ttft_ms"]) == {"8", "16"} and all(v > 0 for v in result["ttft_ms"].values())
    assert result["load_s"] > 0
    assert result["peak_rss_bytes"] > result["peak_rss_increase_bytes"] > 0
    assert result["estimated_memory_bytes"] > 0
    # One single-token run per prompt length plus one decode run, each from an empty cache.
    kinds = [(s["kind"], s["prompt_tokens"]) for s in result["samples"]]
    assert kinds == [("prefill", 8), ("prefill", 16), ("decode", 8)]
    assert all(s["cached_tokens"] == 0 and s["evaluated_tokens"] == s["prompt_tokens"] for s in result["samples"])
    assert result["samples"][-1]["gen_tokens"] == 4
    assert result["energy"]["available"] or result["energy"]["note"].startswith("not available")
    assert set(result["temperature_c"]) == {"before", "after"}
    assert doc["recommendation"]["artifact"]["name"] == "SmolLM2-135M-Instruct"


def test_roofline_is_positive_and_finite(bench_run):
    _, doc = bench_run
    result = doc["results"][0]
    roof = result["roofline"]
    for value in (roof["bandwidth_bytes_s"], roof["ceiling_tok_s"], result["decode_ceiling_tok_s"],
                  result["memory_bandwidth_gbs"]):
        assert value > 0 and math.isfinite(value)
    assert result["decode_ceiling_tok_s"] == roof["ceiling_tok_s"]
    assert math.isclose(roof["bandwidth_bytes_s"] / roof["bytes_per_token"], roof["ceiling_tok_s"])
    assert math.isclose(roof["efficiency"], result["decode_tok_s"] / roof["ceiling_tok_s"])


def test_table_goes_to_stdout_and_progress_to_stderr(bench_run):
    proc, _ = bench_run
    assert proc.stdout.splitlines()[0].startswith("artifact")
    assert "SmolLM2-135M-Instruct Q4_1" in proc.stdout and "read bandwidth" in proc.stdout
    assert "wrote " in proc.stderr


def test_weights_per_token_count_a_tied_head_whole(smollm2_path):
    from edge_runtime.bench.roofline import weights_read_per_token
    from edge_runtime.formats.gguf import read_gguf_header

    header = read_gguf_header(smollm2_path)
    embd = header.tensor("token_embd.weight")
    assert header.tensor("output.weight") is None  # SmolLM2 ties its output head to the embeddings
    everything = sum(t.n_bytes for t in header.tensors)
    assert weights_read_per_token(header) == everything + embd.n_bytes // embd.shape[1]


def test_kv_traffic_grows_with_position_and_stops_at_the_window(gemma_path):
    from edge_runtime.bench.roofline import kv_read_per_token
    from edge_runtime.formats.gguf import read_gguf_header

    header = read_gguf_header(gemma_path)
    window = header.arch_key("attention.sliding_window")
    below = kv_read_per_token(header, window / 2) - kv_read_per_token(header, 0)
    above = kv_read_per_token(header, 3 * window) - kv_read_per_token(header, 2.5 * window)
    assert kv_read_per_token(header, 0) == 0
    assert 0 < above < below  # past the window only the global layers keep growing


def test_bandwidth_measurement_is_positive():
    from edge_runtime.bench.roofline import measure_bandwidth

    measured = measure_bandwidth(32 << 20, threads=2, passes=2)
    assert measured.bytes_s > 0 and math.isfinite(measured.bytes_s)
    assert len(measured.samples_bytes_s) == 2 and measured.bytes_s == max(measured.samples_bytes_s)
    assert measured.buffer_bytes == 32 << 20 and measured.gbs == measured.bytes_s / 1e9


def test_schema_validator_names_the_problem(bench_run):
    _, doc = bench_run
    broken = json.loads(json.dumps(doc))
    broken["results"][0]["decode_tok_s"] = float("nan")
    del broken["results"][0]["ttft_ms"]
    broken["results"][0]["samples"][0]["kind"] = "mystery"
    broken["method"]["reps"] = 0
    broken["results"][0]["ttft_ms_sd"] = {"eight": 1.0}
    broken["memory_bandwidth"]["gbs"] = 0
    problems = schema_errors(broken)
    assert "$.results[0].decode_tok_s: expected number, found NaN/Infinity" in problems
    assert "$.results[0]: missing 'ttft_ms'" in problems
    assert any(p.startswith("$.results[0].samples[0].kind") for p in problems)
    assert "$.method.reps: 0 is below 1" in problems
    assert "$.results[0].ttft_ms_sd: key 'eight' does not match ^[0-9]+$" in problems
    assert "$.memory_bandwidth.gbs: 0 must be above 0" in problems
    with pytest.raises(InvalidConfigError, match="not a valid bench result"):
        check_bench_document(broken)


@pytest.mark.parametrize("args, message", [
    (["--ctx", "64", "--prompt-tokens", "512"], "--ctx 64 cannot hold a 512-token prompt"),
    (["--prompt-tokens", "8,x"], "'x' is not a whole number"),
])
def test_bad_options_are_one_line_errors(edgert_cmd, args, message):
    proc = edgert(edgert_cmd, "bench", *args)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_model_and_artifacts_together_is_a_usage_error(edgert_cmd, smollm2_path):
    proc = edgert(edgert_cmd, "bench", "--model", "smollm2", str(smollm2_path))
    assert proc.returncode == 2 and "not both" in proc.stderr


def test_energy_counter_sums_packages_and_survives_a_wrap(tmp_path):
    from edge_runtime.device.sensors import EnergyCounter

    def domain(name, energy, span=1_000_000):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "energy_uj").write_text(f"{energy}\n")
        (folder / "max_energy_range_uj").write_text(f"{span}\n")

    domain("intel-rapl:0", 999_000)
    domain("intel-rapl:0:0", 5)  # a subdomain (core): part of package 0, not counted again
    domain("intel-rapl:1", 100)
    counter = EnergyCounter(tmp_path)
    assert counter.available and len(counter.domains) == 2
    before = counter.read_uj()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1000\n")  # wrapped past 1 J
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("600\n")
    assert counter.joules_between(before, counter.read_uj()) == pytest.approx((2_000 + 500) / 1e6)
    missing = EnergyCounter(tmp_path / "none")
    assert not missing.available and "no RAPL" in missing.reason
