"""The per-profile build on real files: rungs, manifest, quality, reuse, interruption, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.converters.build import BuildRequest, build, plan_rungs
from edge_runtime.errors import InvalidConfigError, ModelNotFoundError
from edge_runtime.models.manifest import read_manifest, verify_manifest
from edge_runtime.planning.profiles import get_profile

PROFILES = ("raspberry-pi-4-4gb", "apple-m2-8gb")  # first rungs: Q4_0, Q4_1 / Q4_K_M, Q4_0
N_CTX = 128


@pytest.fixture(scope="module")
def two_profile_build(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path, prose_file: Path):
    """The embedded SmolLM2 (a Q4_1 GGUF) built for two profiles, evaluated on a text slice."""
    events = []
    request = BuildRequest(source=str(smollm2_path), out=str(tmp_path_factory.mktemp("build") / "smol"),
                           profiles=tuple(get_profile(p) for p in PROFILES), text=str(prose_file), n_ctx=N_CTX,
                           n_chunks=2, threads=2)
    return request, build(request, on_event=events.append), events


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every GGUF in a folder with its (inode, mtime_ns)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("*.gguf")}


def _no_partial_files(folder: Path) -> None:
    """No temporary file, and every GGUF is one the manifest lists with its hash."""
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    _only_recorded_artifacts(folder)


def _only_recorded_artifacts(folder: Path) -> None:
    """Every GGUF under its artifact name is a finished step the manifest records (none if none)."""
    on_disk = {p.name for p in folder.glob("*.gguf")}
    if not (folder / "manifest.json").exists():
        assert not on_disk
        return
    manifest = read_manifest(folder)
    assert on_disk <= {a.file for a in manifest.artifacts}
    assert all(check.ok for check in verify_manifest(manifest))


def test_two_profiles_build_their_rungs_with_quality_figures(two_profile_build):
    _, result, events = two_profile_build
    m = result.manifest
    by_quant = {a.quant: a for a in m.artifacts}
    assert list(by_quant) == ["F16", "Q4_1", "Q4_K_M", "Q4_0"]  # base first, then larger to smaller
    assert [a.file for a in m.artifacts][0] == "smollm2-135m-instruct-f16.gguf"
    assert by_quant["Q4_0"].profiles == PROFILES
    assert by_quant["Q4_1"].profiles == ("raspberry-pi-4-4gb",)
    assert by_quant["Q4_K_M"].profiles == ("apple-m2-8gb",)
    assert by_quant["F16"].role == "base" and by_quant["F16"].profiles == ()
    base_q = by_quant["F16"].quality
    assert 5 < base_q["ppl"] < 200 and base_q["kld_mean"] is None
    for quant in ("Q4_1", "Q4_0", "Q4_K_M"):
        q = by_quant[quant].quality
        assert q["ppl_ref"] == pytest.approx(base_q["ppl"]) and q["n_ctx"] == N_CTX and q["n_chunks"] == 2
        assert q["kld_mean"] >= 0 and 0 < q["top1_agreement"] <= 1 and q["delta_ppl_pct"] is not None
    # The base is the dequantized Q4_1, so re-quantizing to Q4_1 loses least.
    assert by_quant["Q4_1"].quality["kld_mean"] < by_quant["Q4_0"].quality["kld_mean"]
    assert by_quant["Q4_K_M"].fallbacks  # SmolLM2's 576-wide rows do not fit 256-wide k-quant blocks
    assert m.complete and m.source["kind"] == "gguf" and m.source["quantized"] and m.source["type"] == "Q4_1"
    assert m.tools["llama_cpp_python"] and m.tools["converter"]
    assert len(m.reference["prompts"]) == 4 and all(p["continuation"] for p in m.reference["prompts"])
    assert m.reference["artifact"] == "smollm2-135m-instruct-f16.gguf"
    assert all(c.ok for c in verify_manifest(read_manifest(result.folder)))
    assert {e.stage for e in events} >= {"converting", "quantizing", "evaluating", "reference"}
    _no_partial_files(result.folder)


def test_the_build_is_in_the_store_and_the_planner_walks_its_ladder(two_profile_build):
    from edge_runtime.models.spec import find_artifacts
    from edge_runtime.planning.planner import choose_plan
    from edge_runtime.planning.profiles import get_profile

    _, result, _ = two_profile_build
    assert result.stored_as == "smollm2-135m-instruct"
    for spec in (result.stored_as, str(result.folder)):
        assert sorted(a.quant for a in find_artifacts(spec)) == ["F16", "Q4_0", "Q4_1", "Q4_K_M"]
    from test_store import machine

    artifacts = find_artifacts(result.stored_as)
    assert choose_plan(artifacts, machine(4, 3), get_profile("raspberry-pi-4-4gb")).artifact.quant == "Q4_0"
    assert choose_plan(artifacts, machine(8, 6), get_profile("apple-m2-8gb")).artifact.quant == "Q4_K_M"


def test_a_second_run_reuses_every_file(two_profile_build):
    request, first, _ = two_profile_build
    before = _files(first.folder)
    events = []
    again = build(request, on_event=events.append)
    assert again.built == () and sorted(again.reused) == sorted(before)
    assert _files(first.folder) == before  # same inodes, same mtimes: nothing rewritten
    assert all(e.reused for e in events if e.stage in ("converting", "quantizing", "evaluating", "reference")
               and (e.finished or e.reused))
    assert [a.quality for a in again.manifest.artifacts] == [a.quality for a in first.manifest.artifacts]


def test_the_convert_cli_prints_the_summary_table(two_profile_build):
    from edge_runtime.cli import cli

    request, result, _ = two_profile_build
    # GGUF only: the other formats have their own build test (test_build_formats.py).
    args = ["convert", request.source, "--out", request.out, "--text", request.text, "--ctx", str(N_CTX),
            "--chunks", "2", "--threads", "2", "--format", "gguf"]
    for p in PROFILES:
        args += ["--profile", p]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["artifact", "size", "ppl", "Δppl", "KLD", "top-1", "profiles"]
    assert lines[1].startswith("f16 (reference)")
    assert any(line.startswith("Q4_0") and line.endswith("raspberry-pi-4-4gb, apple-m2-8gb") for line in lines)
    assert any(line.startswith("Q4_K_M*") for line in lines)  # fell-back tensors are flagged
    assert any(line.startswith("* Q4_K_M: ") and "fell back" in line for line in lines)
    assert lines[-1] == f"wrote {result.folder / 'manifest.json'} · added to the model store as smollm2-135m-instruct"
    res = CliRunner().invoke(cli, args + ["--json"])
    assert json.loads(res.stdout)["built"] == []


def test_an_hf_source_converts_quantizes_and_evaluates(tiny_llama_dir, tmp_path, prose_file):
    from edge_runtime.converters import safetensors_source as st
    from edge_runtime.converters.hf_to_gguf import check_source

    result = build(BuildRequest(source=str(tiny_llama_dir), out=str(tmp_path / "tiny"), quants=("Q8_0",),
                                text=str(prose_file), n_ctx=64, n_chunks=2, threads=2, add_to_store=False))
    m = result.manifest
    info = check_source(tiny_llama_dir)
    assert m.source["kind"] == "hf" and m.source["sha256"] == st.hash_files(info.files, info.path)
    assert m.source["architecture"] == "LlamaForCausalLM" and not m.source["quantized"]
    assert [a.quant for a in m.artifacts] == ["F16", "Q8_0"]
    assert all(a.file.startswith(m.model + "-") for a in m.artifacts)
    q8 = m.artifacts[1].quality
    assert q8["ppl"] > 1 and q8["kld_mean"] >= 0 and q8["top1_agreement"] > 0.5
    assert result.stored_as is None


def test_interrupted_in_a_progress_callback_leaves_no_partial_file(tiny_llama_dir, tmp_path):
    request = BuildRequest(source=str(tiny_llama_dir), out=str(tmp_path / "tiny"), quants=("Q8_0", "Q4_0"),
                           evaluate=False, add_to_store=False)

    def interrupt(event):
        if event.stage == "quantizing" and event.label == "Q4_0" and 0 < event.done < event.total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(request, on_event=interrupt)
    folder = tmp_path / "tiny"
    _no_partial_files(folder)
    partial = read_manifest(folder)
    assert not partial.complete and [a.quant for a in partial.artifacts] == ["F16", "Q8_0"]
    before = _files(folder)
    done = build(request)
    assert done.manifest.complete and [a.quant for a in done.manifest.artifacts] == ["F16", "Q8_0", "Q4_0"]
    assert done.built == (f"{done.manifest.model}-Q4_0.gguf",)
    assert {k: v for k, v in _files(folder).items() if k in before} == before


def _convert_process(source: str, out: Path) -> subprocess.Popen:
    """`edgert convert` in its own process group, as a terminal runs a job."""
    code = ("import sys; from edge_runtime.cli import cli; from edge_runtime.cli.convert import convert; "
            "cli.add_command(convert); cli(sys.argv[1:], prog_name='edgert')")
    args = ["convert", source, "--out", str(out), "--quant", "Q8_0", "--no-eval", "--no-store", "--threads", "1"]
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)


def _temp_files(folder: Path) -> set[int]:
    return {p.stat().st_ino for p in folder.glob(".*.tmp")} if folder.is_dir() else set()


def _wait_for_new_temp_file(proc: subprocess.Popen, folder: Path, old: set[int], timeout: float = 180) -> bool:
    """Wait until the process is writing a temporary file (not one a killed run left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if _temp_files(folder) - old:
                return True
        except FileNotFoundError:  # a file renamed or swept between listing and stat
            pass
        time.sleep(0.05)
    return False


def test_killed_or_interrupted_processes_leave_no_partial_file_and_the_rerun_finishes(smollm2_path, tmp_path):
    folder = tmp_path / "smol"
    # kill -9 of the whole job mid-conversion: nothing can clean up, so the temporary file stays
    # (hidden, never under the artifact's name) until the next run sweeps it.
    proc = _convert_process(str(smollm2_path), folder)
    assert _wait_for_new_temp_file(proc, folder, set()), proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _only_recorded_artifacts(folder)  # a step that finished before the kill is kept, and nothing else
    stale = _temp_files(folder)
    # Ctrl-C of the job mid-conversion: exit 130, no traceback, its temporary file removed.
    proc = _convert_process(str(smollm2_path), folder)
    assert _wait_for_new_temp_file(proc, folder, stale), proc.communicate()
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    _no_partial_files(folder)  # the F16 step may have finished before the signal (a fast machine)
    result = build(BuildRequest(source=str(smollm2_path), out=str(folder), quants=("Q8_0",), evaluate=False,
                                add_to_store=False, threads=2))
    assert result.manifest.complete and [a.quant for a in result.manifest.artifacts] == ["F16", "Q8_0"]
    _no_partial_files(folder)


def test_rungs_come_from_the_profiles_ladders_or_from_quant():
    from dataclasses import replace

    pi5, laptop = get_profile("raspberry-pi-5-8gb"), get_profile("laptop-x86-16gb")
    rungs, warnings = plan_rungs((pi5, laptop), None, "f16")
    assert [(r.qtype, r.profiles) for r in rungs] == [
        ("Q4_K_M", ("laptop-x86-16gb",)), ("Q4_K_S", ("laptop-x86-16gb",)),
        ("Q4_0", ("raspberry-pi-5-8gb",)), ("IQ4_NL", ("raspberry-pi-5-8gb",))]
    rungs, _ = plan_rungs((pi5,), ("q8_0", "Q2_K", "F16"), "f16")
    assert [(r.qtype, r.profiles) for r in rungs] == [
        ("F16", ()), ("Q8_0", ("raspberry-pi-5-8gb",)), ("Q2_K", ("raspberry-pi-5-8gb",))]
    assert plan_rungs((), None, "f16") == ([], [])
    with pytest.raises(InvalidConfigError, match="unknown quantization type"):
        plan_rungs((), ("Q9_9",), "f16")

    imatrix_first = replace(get_profile("generic"), id="imatrix-first", quants={"gguf": ("IQ2_XS", "Q4_0", "Q8_0")})
    rungs, warnings = plan_rungs((imatrix_first,), None, "f16")
    assert [r.qtype for r in rungs] == ["Q8_0", "Q4_0"] and "IQ2_XS" in warnings[0]


def test_bad_requests_fail_before_anything_is_written(tmp_path):
    with pytest.raises(ModelNotFoundError):
        build(BuildRequest(source=str(tmp_path / "nothing-here"), out=str(tmp_path / "o")))
    with pytest.raises(InvalidConfigError, match="no such text file"):
        build(BuildRequest(source="smollm2", out=str(tmp_path / "o"), quants=("Q8_0",), text=str(tmp_path / "x.txt")))
    with pytest.raises(InvalidConfigError, match="outtype"):
        build(BuildRequest(source="smollm2", out=str(tmp_path / "o"), outtype="f8"))
    assert not (tmp_path / "o").exists()


def test_list_supported_architectures():
    from edge_runtime.cli import cli
    from edge_runtime.cli.convert import convert

    if "convert" not in cli.commands:
        cli.add_command(convert)
    res = CliRunner().invoke(cli, ["convert", "--list-supported"])
    assert res.exit_code == 0 and "LlamaForCausalLM" in res.stdout.split()
    res = CliRunner().invoke(cli, ["convert"])
    assert res.exit_code == 2 and "missing SRC" in res.output
    assert os.environ["EDGERT_HOME"]  # the session store, never the user's
