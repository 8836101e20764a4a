"""`edgert bench --anatomy`: the four parts measured for real on SmolLM2, the schema, and the report."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from edge_runtime.bench.schema import schema_errors
from edge_runtime.report.anatomy import LEVERS, dominant, reply_breakdown

PARTS = {
    "storage": ("cold_load_s", "warm_load_s", "first_prefill_pagein_s"),
    "transfer": ("in_process_ttft_ms", "http_ttft_ms", "rpc_ttft_ms"),
    "cache": ("cold_ttft_ms", "restored_ttft_ms", "hot_ttft_ms"),
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@pytest.fixture(scope="module")
def anatomy_run(edgert_cmd, tmp_path_factory):
    """One short bench with --anatomy (tiny settings), as JSON."""
    out = tmp_path_factory.mktemp("anatomy") / "bench.json"
    subprocess.run([*edgert_cmd, "bench", "--model", "smollm2", "--threads", "2", "--ctx", "512",
                    "--prompt-tokens", "8,32", "--gen-tokens", "4", "--reps", "1", "--warmup", "0",
                    "--bandwidth-mib", "32", "--anatomy", "--json", str(out)],
                   check=True, capture_output=True, text=True, timeout=900)
    return out


def test_the_anatomy_has_four_parts_of_numbers(anatomy_run):
    doc = json.loads(anatomy_run.read_text())
    assert schema_errors(doc) == []
    anatomy = doc["results"][0]["anatomy"]
    assert set(anatomy) == {"storage", "compute", "transfer", "cache"}
    for part, keys in PARTS.items():
        for key in keys:
            value = anatomy[part][key]
            nullable = key in ("rpc_ttft_ms", "restored_ttft_ms")
            assert _is_number(value) or (nullable and value is None), f"{part}.{key} = {value!r}"
    assert anatomy["transfer"]["rpc_ttft_ms"] is None  # no workers named
    assert _is_number(anatomy["cache"]["restored_ttft_ms"])  # llama.cpp restores from the disk prompt cache
    assert anatomy["cache"]["restored_note"] is None
    compute = anatomy["compute"]
    assert set(compute["prefill_tok_s"]) == set(compute["decode_tok_s"]) == {"1", "2"}  # 1..N threads
    assert all(v > 0 for curve in (compute["prefill_tok_s"], compute["decode_tok_s"]) for v in curve.values())
    assert all(_is_number(v) for v in anatomy["storage"].values())


def test_the_report_draws_and_explains_the_anatomy(anatomy_run, edgert_cmd, tmp_path):
    subprocess.run([*edgert_cmd, "report", str(anatomy_run), "--out", str(tmp_path)], check=True,
                   capture_output=True, text=True, timeout=300)
    markdown = (tmp_path / "report.md").read_text()
    assert "Latency anatomy of one reply" in markdown
    assert "short (8 tok)" in markdown and "long (32 tok)" in markdown
    assert any(lever in markdown for lever in LEVERS.values())
    assert (tmp_path / "anatomy-1.png").read_bytes().startswith(b"\x89PNG")
    assert "Latency anatomy of one reply" in (tmp_path / "report.html").read_text()


def test_a_result_with_a_broken_anatomy_is_refused(anatomy_run):
    doc = json.loads(anatomy_run.read_text())
    for part, key, bad in (("storage", "cold_load_s", "slow"), ("cache", "hot_ttft_ms", None),
                           ("transfer", "http_ttft_ms", -1)):
        broken = copy.deepcopy(doc)
        broken["results"][0]["anatomy"][part][key] = bad
        assert any(f"anatomy.{part}.{key}" in line for line in schema_errors(broken))
    broken = copy.deepcopy(doc)
    del broken["results"][0]["anatomy"]["compute"]
    assert schema_errors(broken)


def _anatomy(cold_load_s: float, prefill: float, decode: float, http_ms: float) -> dict:
    return {"storage": {"cold_load_s": cold_load_s, "warm_load_s": 0.1, "first_prefill_pagein_s": 0.0},
            "compute": {"prefill_tok_s": {"1": prefill / 2, "2": prefill}, "decode_tok_s": {"1": decode, "2": decode}},
            "transfer": {"in_process_ttft_ms": 10.0, "http_ttft_ms": http_ms, "rpc_ttft_ms": None},
            "cache": {"cold_ttft_ms": 1.0, "restored_ttft_ms": None, "hot_ttft_ms": 0.5}}


@pytest.mark.parametrize("anatomy, prompt, gen, expected", [
    (_anatomy(5.0, 100, 10, 10), 32, 16, "load"),
    (_anatomy(0.1, 50, 100, 10), 2000, 16, "prefill"),
    (_anatomy(0.1, 1000, 5, 10), 32, 128, "decode"),
    (_anatomy(0.1, 1000, 1000, 4000), 32, 16, "transfer"),
])
def test_the_dominant_term_and_its_lever(anatomy, prompt, gen, expected):
    terms = reply_breakdown(anatomy, prompt, gen)
    assert set(terms) == set(LEVERS)
    assert dominant(terms) == expected
    assert terms["prefill"] == pytest.approx(prompt / max(anatomy["compute"]["prefill_tok_s"].values()))
