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
    from edge_runtime.models import MODEL_HELP

    group.addoption("--edgert-model", default=None, help=f"The model to check. {MODEL_HELP}")
    group.addoption("--edgert-out", default="edgert-device-test", help="folder for bench.json and the report")
    group.addoption("--edgert-reps", type=int, default=3, help="bench repetitions")
    group.addoption("--edgert-gen-tokens", type=int, default=GEN_TOKENS, help="tokens the bench decodes")
    group.addoption("--edgert-prompt-tokens", default=",".join(map(str, PROMPT_TOKENS)),
                    help="prompt lengths the bench measures, comma-separated")


@dataclass(frozen=True)
class SuiteOptions:
    """What the user asked the suite to check."""

    model: str | None
    out: Path
    reps: int
    gen_tokens: int = GEN_TOKENS
    prompt_tokens: tuple[int, ...] = PROMPT_TOKENS


@pytest.fixture(scope="session")
def options(request: pytest.FixtureRequest) -> SuiteOptions:
    get = request.config.getoption
    prompts = tuple(sorted(int(p) for p in str(get("--edgert-prompt-tokens")).split(",") if p.strip()))
    return SuiteOptions(model=get("--edgert-model"), out=Path(get("--edgert-out")),
                        reps=max(1, int(get("--edgert-reps"))), gen_tokens=max(2, int(get("--edgert-gen-tokens"))),
                        prompt_tokens=tuple(p for p in prompts if p > 0) or PROMPT_TOKENS)


@pytest.fixture(scope="session")
def device() -> Any:
    import edge_runtime

    return edge_runtime.detect()


@pytest.fixture(scope="session")
def profile(device: Any) -> Any:
    from edge_runtime.planning.profiles import match_profile

    return match_profile(device)


@pytest.fixture(scope="session")
def plan(options: SuiteOptions, device: Any, profile: Any) -> Any:
    """What ``edgert plan`` chooses for the model on this device (the matched profile)."""
    import edge_runtime

    return edge_runtime.plan(options.model, device=device, profile=profile)


@pytest.fixture(scope="session")
def model(plan: Any) -> Any:
    """The planned artifact, loaded with the plan's settings (in this process)."""
    from edge_runtime.backends import open_artifact

    loaded = open_artifact(plan.artifact, plan.settings, backend=plan.backend)
    yield loaded
    loaded.close()


@pytest.fixture(scope="session")
def bench_result(options: SuiteOptions, plan: Any) -> dict[str, Any]:
    """One ``edgert bench`` of the planned artifact with the plan's settings, saved as bench.json."""
    from edge_runtime.bench.runner import BenchRequest, run_bench
    from edge_runtime.files import atomic_write

    # The plan's own context, unless it is too short for the longest prompt (a tight memory fit).
    prompts, gen = options.prompt_tokens, options.gen_tokens
    need = max(prompts[-1] + 2, prompts[0] + gen + 1)
    request = BenchRequest(models=(plan.artifact.path,), backends=(plan.backend,),
                           threads=(plan.settings.n_threads,) if plan.settings.n_threads else (),
                           ctx=max(plan.settings.n_ctx, need), prompt_tokens=prompts, gen_tokens=gen,
                           reps=options.reps, warmup=1)
    doc = run_bench(request).to_dict()
    atomic_write(options.out / "bench.json", json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return doc



# The verdict (verdict.py): what each check is, and how it went, in the order the checks ran.
_TITLES: dict[str, str] = {}
_OUTCOMES: dict[str, Any] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from edge_runtime.device_tests.verdict import check_title

    _TITLES.update((item.nodeid, check_title(item)) for item in items)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    from edge_runtime.device_tests.verdict import outcome_of

    outcome = outcome_of(_TITLES.get(report.nodeid, report.nodeid), report, _OUTCOMES.get(report.nodeid))
    if outcome is not None:
        _OUTCOMES[report.nodeid] = outcome


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Print the verdict and write it to ``verdict.md`` in the output folder."""
    from edge_runtime.device_tests.verdict import format_verdict, write_verdict

    if not _OUTCOMES:
        return
    text = format_verdict(list(_OUTCOMES.values()))
    path = write_verdict(text, Path(config.getoption("--edgert-out")))
    terminalreporter.write_sep("=", "verdict")
    terminalreporter.write_line(text.rstrip())
    terminalreporter.write_line(f"(written to {path})")
