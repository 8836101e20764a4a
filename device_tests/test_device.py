"""Does this device meet its profile? Detection, loading, reference output, speed and memory."""

from __future__ import annotations

from typing import Any

import pytest

from edge_runtime.device_tests.conftest import MEMORY_TOLERANCE

MIB = 1 << 20


def test_detection_is_sane(device: Any, profile: Any, record_property: Any) -> None:
    """Detection finds the CPU, memory, OS and llama.cpp, and a profile matches."""
    cpu, mem = device.cpu, device.memory
    assert cpu.arch, f"CPU architecture not detected ({device.notes.get('cpu.arch')})"
    assert cpu.logical_cores and cpu.logical_cores >= 1, "no CPU cores detected"
    assert cpu.physical_cores and 1 <= cpu.physical_cores <= cpu.logical_cores
    assert mem.total_bytes and mem.total_bytes > 256 * MIB, "total RAM not detected"
    assert mem.available_bytes is not None and 0 < mem.available_bytes <= mem.total_bytes
    assert device.os.system, "operating system not detected"
    llama = device.backend("llama.cpp")
    assert llama is not None and llama.available, f"llama.cpp backend unavailable: {llama and llama.reason}"
    assert profile.id, "no device profile matched"
    record_property("verdict", f"{cpu.logical_cores} logical cores, {mem.total_bytes / (1 << 30):.1f} GiB, "
                               f"profile {profile.id}")


def test_planned_artifact_loads(plan: Any, model: Any, record_property: Any) -> None:
    """The planned artifact loads with the plan's settings and generates."""
    from edge_runtime.backends.base import SamplingParams

    tokens = model.tokenize("Hello", add_bos=model.info.add_bos)
    events = list(model.generate(tokens, SamplingParams(max_tokens=2, temperature=0)))
    assert events and events[-1].stats is not None
    assert events[-1].stats.gen_tokens >= 1 or events[-1].finish_reason == "stop"
    assert model.info.n_ctx == plan.settings.n_ctx
    record_property("verdict", f"{plan.artifact.label} on {plan.backend}, n_ctx {plan.settings.n_ctx}")


def test_greedy_output_matches_reference(plan: Any, model: Any, record_property: Any) -> None:
    """Greedy output matches the reference continuations (exactly, or teacher-forced on other kernels)."""
    from edge_runtime.device_tests.reference_check import (
        agreement_bar,
        exact_mismatches,
        find_reference,
        same_weights,
        teacher_forced_agreement,
        why_not_exact,
    )

    source, why = find_reference(plan.artifact.path)
    if source is None:
        pytest.skip(f"no reference continuation to compare: {why}")
    ref = source.reference
    same = same_weights(ref, plan.artifact.path, plan.artifact.sha256)
    if same and not why_not_exact(ref, plan.backend, plan.settings):
        wrong = exact_mismatches(model, ref)
        assert not wrong, (f"greedy output differs from {source.where} (the same artifact and kernels must give "
                           f"the same text):\n  " + "\n  ".join(wrong))
        record_property("verdict", f"the exact text of {len(ref.cases)} prompts, against {source.where}")
        return
    agree, total = teacher_forced_agreement(model, ref)
    bar = agreement_bar(same, plan.artifact.quality)
    reason = why_not_exact(ref, plan.backend, plan.settings) if same else "other weights than the reference's"
    assert total and agree / total >= bar, (
        f"greedy next token agrees with {source.where} {agree}/{total} times ({agree / max(total, 1):.0%}); "
        f"at least {bar:.0%} expected for {plan.artifact.label} (teacher-forced: {reason})")
    record_property("verdict", f"teacher-forced top-1 agreement {agree}/{total} ({agree / total:.0%} ≥ {bar:.0%}) "
                               f"with {source.where} ({reason})")


def test_decode_reaches_profile_floor(bench_result: dict[str, Any], record_property: Any) -> None:
    """Decode reaches the floor of the profile's device class for the planned artifact."""
    from edge_runtime.bench.result import BenchResult
    from edge_runtime.report.tables import floor_check

    check = floor_check(BenchResult.from_dict(bench_result))
    if check.status == "not measured":
        pytest.skip(f"no floor could be worked out ({check.what}): {check.why}")
    assert check.status == "meets", f"below the floor: {check.why}"  # why: measured, expected, how
    record_property("verdict", check.why)


def test_memory_stays_inside_the_plan_estimate(bench_result: dict[str, Any], record_property: Any) -> None:
    """Peak memory stays inside the plan's estimate."""
    result = bench_result["results"][0]
    used, estimate = result.get("peak_rss_increase_bytes"), result.get("estimated_memory_bytes")
    if used is None or not estimate:
        pytest.skip("peak RSS cannot be read on this platform")
    assert used <= estimate * MEMORY_TOLERANCE, (
        f"peak RSS grew by {used / MIB:.0f} MiB; the plan estimated {estimate / MIB:.0f} MiB "
        f"(+{(MEMORY_TOLERANCE - 1):.0%} allowed)")
    record_property("verdict", f"peak RSS +{used / MIB:.0f} MiB, estimate {estimate / MIB:.0f} MiB")


def test_report_is_written(options: Any, bench_result: dict[str, Any]) -> None:
    """The bench report is written (report.html, report.md, report.json)."""
    from edge_runtime.report import build_report, write_report

    written = write_report(build_report([options.out / "bench.json"]), options.out)
    names = {p.name for p in written}
    assert {"report.html", "report.md", "report.json"} <= names
