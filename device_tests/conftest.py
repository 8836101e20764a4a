"""Options and shared fixtures of the on-device suite: the device, its plan, one bench run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# Prompt lengths and decode length of the suite's bench run: enough to measure a device honestly,
# short enough that a Raspberry Pi finishes the suite in a few minutes.
PROMPT_TOKENS = (32, 128, 512)
GEN_TOKENS = 128
MEMORY_TOLERANCE = 1.15  # measured peak RSS increase may exceed the plan's estimate by 15 %


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("edgert", "edge-runtime device tests")
    group.addoption("--edgert-model", default=None, help="model to check (default: the planner's choice)")
    group.addoption("--edgert-out", default="edgert-device-test", help="folder for bench.json and the report")
    group.addoption("--edgert-reps", type=int, default=3, help="bench repetitions")


@dataclass(frozen=True)
class SuiteOptions:
    """What the user asked the suite to check."""

    model: str | None
    out: Path
    reps: int


@pytest.fixture(scope="session")
def options(request: pytest.FixtureRequest) -> SuiteOptions:
    return SuiteOptions(model=request.config.getoption("--edgert-model"),
                        out=Path(request.config.getoption("--edgert-out")),
                        reps=max(1, int(request.config.getoption("--edgert-reps"))))


@pytest.fixture(scope="session")
def device() -> Any:
    from edge_runtime.device.info import detect

    return detect()


@pytest.fixture(scope="session")
def profile(device: Any) -> Any:
    from edge_runtime.planning.profiles import match_profile

    return match_profile(device)


@pytest.fixture(scope="session")
def plan(options: SuiteOptions, device: Any, profile: Any) -> Any:
    """What ``edgert plan`` chooses for the model on this device."""
    from edge_runtime.models.spec import find_artifacts
    from edge_runtime.planning.planner import choose_plan

    return choose_plan(find_artifacts(options.model), device, profile)


@pytest.fixture(scope="session")
def model(plan: Any) -> Any:
    """The planned artifact, loaded with the plan's settings (in this process)."""
    from edge_runtime.backends import load_backend

    loaded = load_backend(plan.backend).load(plan.artifact.path, plan.settings)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def bench_result(options: SuiteOptions, plan: Any) -> dict[str, Any]:
    """One ``edgert bench`` of the planned artifact with the plan's settings, saved as bench.json."""
    from edge_runtime.bench.runner import BenchRequest, run_bench
    from edge_runtime.files import atomic_write

    # The plan's own context, unless it is too short for the longest prompt (a tight memory fit).
    need = max(PROMPT_TOKENS[-1] + 2, PROMPT_TOKENS[0] + GEN_TOKENS + 1)
    request = BenchRequest(models=(plan.artifact.path,), backends=(plan.backend,),
                           threads=(plan.settings.n_threads,) if plan.settings.n_threads else (),
                           ctx=max(plan.settings.n_ctx, need), prompt_tokens=PROMPT_TOKENS, gen_tokens=GEN_TOKENS,
                           reps=options.reps, warmup=1)
    doc = run_bench(request).to_dict()
    atomic_write(options.out / "bench.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc


@dataclass(frozen=True)
class Reference:
    """The manifest's greedy continuations of fixed prompts by the unquantized artifact."""

    artifact: str | None  # file name of the artifact that wrote them
    artifact_sha256: str | None
    max_tokens: int | None
    add_bos: bool | None
    cases: tuple[dict[str, Any], ...]  # {"prompt", "continuation", "tokens"?}


def reference_for(artifact_path: str) -> tuple[Reference | None, str]:
    """The reference in the manifest beside the artifact (checked by ``read_manifest``), or why none.

    The manifest's ``reference`` is what ``edgert convert`` writes: ``artifact``,
    ``artifact_sha256``, ``max_tokens``, ``add_bos`` and ``prompts`` (each ``prompt``,
    ``continuation`` and the continuation's ``tokens``).
    """
    from edge_runtime.models.manifest import has_manifest, read_manifest

    folder = Path(artifact_path).parent
    if not has_manifest(folder):
        return None, "the artifact has no manifest.json beside it (not a convert output)"
    ref = read_manifest(folder, check_files=False).reference  # a damaged manifest fails the test
    if not isinstance(ref, dict) or not isinstance(ref.get("prompts"), list) or not ref["prompts"]:
        return None, f"{folder / 'manifest.json'} records no reference continuations"
    cases = tuple(p for p in ref["prompts"] if isinstance(p, dict)
                  and isinstance(p.get("prompt"), str) and isinstance(p.get("continuation"), str))
    if not cases:
        return None, f"{folder / 'manifest.json'}: no reference entry has a prompt and a continuation"
    return Reference(ref.get("artifact"), ref.get("artifact_sha256"), ref.get("max_tokens"), ref.get("add_bos"),
                     cases), ""
