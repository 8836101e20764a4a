"""Does this device meet its profile? Detection, loading, reference output, speed and memory."""

from __future__ import annotations

from typing import Any

import pytest

from edge_runtime.device_tests.conftest import MEMORY_TOLERANCE, reference_for

MIB = 1 << 20
# A quantized artifact's free-running greedy text leaves the unquantized reference early (a
# Q4_0 SmolLM2-135M differs at the first token of "The capital of France is"), so it is checked
# teacher-forced instead: along each reference continuation, how often its greedy next token is
# the reference's. Measured here: 0.55-0.81 per prompt for that Q4_0, 1.0 for the f16 reference;
# a runtime computing wrongly scores near 0. The bar is the manifest's own top-1 agreement less a
# margin (it was measured on other text), or AGREEMENT_FLOOR where the manifest has none.
AGREEMENT_FLOOR = 0.5
AGREEMENT_MARGIN = 0.15


def test_detection_is_sane(device: Any, profile: Any) -> None:
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


def test_planned_artifact_loads(plan: Any, model: Any) -> None:
    from edge_runtime.backends.base import SamplingParams

    tokens = model.tokenize("Hello", add_bos=model.info.add_bos)
    events = list(model.generate(tokens, SamplingParams(max_tokens=2, temperature=0)))
    assert events and events[-1].stats is not None
    assert events[-1].stats.gen_tokens >= 1 or events[-1].finish_reason == "stop"
    assert model.info.n_ctx == plan.settings.n_ctx


def _common_prefix(a: Any, b: Any) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _greedy(model: Any, tokens: list[int], n: int) -> list[Any]:
    from edge_runtime.backends.base import SamplingParams

    return list(model.generate(tokens, SamplingParams(max_tokens=max(1, n), temperature=0)))


def test_greedy_output_matches_reference(plan: Any, model: Any) -> None:
    from pathlib import Path

    ref, why = reference_for(plan.artifact.path)
    if ref is None:
        pytest.skip(f"no reference continuation to compare: {why}")
    is_reference = (Path(plan.artifact.path).name == ref.artifact
                    or (ref.artifact_sha256 is not None and plan.artifact.sha256 == ref.artifact_sha256))
    add_bos = model.info.add_bos if ref.add_bos is None else ref.add_bos
    reset = getattr(model, "reset", lambda: None)
    agree = total = 0
    for case in ref.cases:
        prompt = model.tokenize(case["prompt"], add_bos=add_bos)
        want = case.get("tokens") or model.tokenize(case["continuation"])
        reset()
        if is_reference:  # the very artifact that wrote the reference: the same text, exactly
            events = _greedy(model, prompt, ref.max_tokens or len(want))
            text = "".join(e.text for e in events)
            assert text == case["continuation"], (
                f"prompt {case['prompt']!r}: greedy output differs from the reference\n"
                f"  got:      {text!r}\n  expected: {case['continuation']!r}")
            continue
        for i, token in enumerate(want):  # teacher-forced; prefix reuse makes each step one token
            agree += _greedy(model, prompt + list(want[:i]), 1)[0].token == token
        total += len(want)
    if is_reference or not total:
        return
    measured = (plan.artifact.quality or {}).get("top1_agreement")
    bar = measured - AGREEMENT_MARGIN if isinstance(measured, (int, float)) else AGREEMENT_FLOOR
    assert agree / total >= bar, (f"greedy next token agrees with the reference {agree}/{total} times "
                                  f"({agree / total:.0%}); at least {bar:.0%} expected for {plan.artifact.label}")


def test_decode_reaches_profile_floor(bench_result: dict[str, Any]) -> None:
    from edge_runtime.bench.runner import BenchResult
    from edge_runtime.report.tables import floor_check

    check = floor_check(BenchResult.from_dict(bench_result))
    if check.status == "not measured":
        pytest.skip(f"the profile's floor ({check.what}) is for another model: {check.why}")
    assert check.status == "meets", f"decode below the profile floor {check.what}: {check.why}"


def test_memory_stays_inside_the_plan_estimate(bench_result: dict[str, Any]) -> None:
    result = bench_result["results"][0]
    used, estimate = result.get("peak_rss_increase_bytes"), result.get("estimated_memory_bytes")
    if used is None or not estimate:
        pytest.skip("peak RSS cannot be read on this platform")
    assert used <= estimate * MEMORY_TOLERANCE, (
        f"peak RSS grew by {used / MIB:.0f} MiB; the plan estimated {estimate / MIB:.0f} MiB "
        f"(+{(MEMORY_TOLERANCE - 1):.0%} allowed)")


def test_report_is_written(options: Any, bench_result: dict[str, Any]) -> None:
    from edge_runtime.report import build_report, write_report

    written = write_report(build_report([options.out / "bench.json"]), options.out)
    names = {p.name for p in written}
    assert {"report.html", "report.md", "report.json"} <= names
