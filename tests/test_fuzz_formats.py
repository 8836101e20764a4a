"""Hostile model files through the public API, in CI: ``benchmarks/fuzz_formats.py``'s harness with
100 seeded mutants per format (the same every run).

Each mutant is loaded with ``edge_runtime.load(path)`` and a two-token generation in a worker
process that is replaced when it dies; none may crash it, hang it, raise a traceback or make it
open a file outside the mutant's folder (strace watches native opens where it is installed). The
worker runs with ``EDGERT_TRIAL_LOAD=0``, so these are the figures of our own format checks in
front of llama.cpp, LiteRT and onnxruntime, not of the trial load behind them. A crash that does
not recur with the same file alone in a fresh worker is printed as flaky, not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
N = 100
SEED = 0


@pytest.fixture(scope="module")
def harness():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import fuzz_formats

    return fuzz_formats


def fuzz_one(harness, fmt: str, seed: Path, out: Path) -> None:
    report = harness.fuzz({fmt: seed}, N, SEED, out)
    harness.print_report(report, (fmt,), N, 0.0)  # shown with -s, or when the assertion fails
    counts = {outcome: sum(n for (f, _, o), n in report.counts.items() if f == fmt and o == outcome)
              for outcome in harness.OUTCOMES}
    assert sum(counts.values()) == N and counts["error"] > N // 4  # the checks were exercised
    assert report.bad(fmt) == 0, "\n".join(report.findings)


@pytest.mark.slow
def test_gguf_mutants(harness, tiny_llama_dir, tmp_path):
    from edge_runtime.converters.hf_to_gguf import convert_hf_to_gguf

    seed = convert_hf_to_gguf(tiny_llama_dir, tmp_path / "seed" / "tiny-f32.gguf", outtype="f32").path
    fuzz_one(harness, "gguf", seed, tmp_path / "findings")


@pytest.mark.slow
def test_tflite_mutants(harness, request, tiny_llama_dir, tmp_path):
    from test_tflite import _converted  # skips, with its reason, where LiteRT or litert-torch is missing

    fuzz_one(harness, "tflite", _converted(request, tiny_llama_dir, "none"), tmp_path / "findings")


@pytest.mark.slow
def test_onnx_mutants(harness, request, tiny_llama_dir, tmp_path):
    pytest.importorskip("onnx", reason="the ONNX mutations rewrite graphs with the onnx package")
    from contract.conftest import _onnx_fp32  # the contract suite's cached conversion

    fuzz_one(harness, "onnx", _onnx_fp32(request, tiny_llama_dir), tmp_path / "findings")
