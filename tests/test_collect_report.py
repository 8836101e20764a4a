"""scripts/collect_report.sh: device-test folders from several devices gathered into one folder, and
`edgert report --fleet` over it. Local paths only (a remote source goes through rsync or scp, the
same copy); the bench results are real ones from `edgert bench` on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "collect_report.sh"
EDGERT = str(Path(sys.executable).parent / "edgert")


def collect(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env={**os.environ, "EDGERT": EDGERT})


@pytest.fixture(scope="module")
def bench_doc(edgert_cmd) -> dict:
    """A real, short `edgert bench` result, as `edgert device-test` leaves in its folder."""
    proc = subprocess.run([*edgert_cmd, "bench", "--prompt-tokens", "8", "--gen-tokens", "4", "--reps", "1",
                           "--warmup", "0", "--threads", "1", "--bandwidth-mib", "32", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def device_folder(root: Path, name: str, doc: dict, board: str) -> Path:
    """``root/name/edgert-device-test`` holding a bench.json (the board renamed: another device)."""
    folder = root / name / "edgert-device-test"
    folder.mkdir(parents=True)
    doc = {**doc, "device": {**doc["device"], "board": {**doc["device"]["board"], "model": board}}}
    (folder / "bench.json").write_text(json.dumps(doc))
    (folder / "device-tests.xml").write_text("<testsuites/>")
    return folder


def test_devices_are_gathered_and_reported_as_one_fleet(bench_doc, tmp_path):
    pi = device_folder(tmp_path / "copies", "pi5", bench_doc, "Raspberry Pi 5 Model B Rev 1.0")
    jetson = device_folder(tmp_path / "copies", "orin", bench_doc, "NVIDIA Jetson Orin Nano")
    laptop = device_folder(tmp_path / "copies", "laptop", bench_doc, "ThinkPad X1")
    res = collect("--out", "fleet", pi, f"nano={jetson / 'bench.json'}", laptop, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    fleet = tmp_path / "fleet"
    # A device-test folder is named after the folder above it; NAME= names it; a file gives its bench.json.
    assert sorted(p.name for p in fleet.iterdir()) == ["laptop", "nano", "pi5", "report"]
    assert (fleet / "pi5" / "device-tests.xml").is_file() and not (fleet / "nano" / "device-tests.xml").exists()
    report = json.loads((fleet / "report" / "report.json").read_text())
    assert sorted(row["device"] for row in report["summary"]) == [
        "NVIDIA Jetson Orin Nano", "Raspberry Pi 5 Model B Rev 1.0", "ThinkPad X1"]
    assert (fleet / "report" / "report.html").is_file() and "gathered 3 device(s)" in res.stderr


def test_a_second_gathering_replaces_a_device_and_keeps_names_apart(bench_doc, tmp_path):
    first = device_folder(tmp_path / "a", "pi", bench_doc, "Pi one")
    second = device_folder(tmp_path / "b", "pi", bench_doc, "Pi two")
    res = collect("--no-report", first, second, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    fleet = tmp_path / "edgert-fleet"  # the default folder
    assert sorted(p.name for p in fleet.iterdir()) == ["pi", "pi-2"]  # same name twice: kept apart
    assert not (fleet / "report").exists()  # --no-report
    (second / "bench.json").write_text(json.dumps({**bench_doc, "created": "2031-01-01T00:00:00+00:00"}))
    (fleet / "pi" / "stale-file").write_text("from the first gathering")
    again = collect("--no-report", f"pi={second}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads((fleet / "pi" / "bench.json").read_text())["created"].startswith("2031")
    assert not (fleet / "pi" / "stale-file").exists() and not list(fleet.glob(".*"))  # no staging folders left


def test_a_local_path_with_a_colon_is_not_taken_for_a_host(bench_doc, tmp_path):
    odd = device_folder(tmp_path, "board:rev2", bench_doc, "Odd name")
    res = collect("--no-report", f"rev2={odd}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "edgert-fleet" / "rev2" / "bench.json").is_file()


def test_mistakes_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ((), 2, "name at least one SOURCE"),
        (("--bogus", "x"), 2, "unknown option '--bogus'"),
        ((tmp_path / "not-there",), 1, "does not exist"),
        ((f"bad/name={empty}",), 1, None),  # not NAME=: a path that does not exist
        ((f"..={empty}",), 1, "cannot make a folder name"),
    ]
    for args, code, message in cases:
        res = collect(*args, cwd=tmp_path)
        assert res.returncode == code, (args, res.stderr)
        assert res.stderr.startswith("collect_report: error:") and "line " not in res.stderr, res.stderr
        assert message is None or message in res.stderr, res.stderr
    # A folder without bench.json is gathered with a warning; the report over nothing is one clear error.
    res = collect("--out", "fleet", empty, cwd=tmp_path)
    assert res.returncode != 0 and "has no bench.json" in res.stderr
    assert "holds no bench.json" in res.stderr and "Traceback" not in res.stderr


def test_help_is_the_header():
    res = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and res.stdout.startswith("Gather the reports") and "user@host:path" in res.stdout
