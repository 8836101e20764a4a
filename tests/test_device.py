"""Device detection: on this machine, and on fixture file trees of a Pi 4, Pi 5, Jetson and laptop."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from edge_runtime.backends.base import Availability
from edge_runtime.device.cpu import cpu_features, parse_cpu_list, parse_cpuinfo, parse_sysctl
from edge_runtime.device.describe import format_device
from edge_runtime.device.info import BoardInfo, CpuInfo, DeviceInfo, GpuInfo, MemoryInfo, ThermalInfo, detect
from edge_runtime.device.readers import parse_meminfo, parse_tegra_release, parse_throttled

MACHINES = Path(__file__).parent / "data" / "device"
GIB = 1024**3


def machine(name: str, tmp_path: Path, extra: dict[str, str] | None = None) -> Path:
    """A copy of a fixture machine, plus files whose names git checkouts may not hold (':')."""
    root = tmp_path / name
    shutil.copytree(MACHINES / name, root)
    for rel, text in (extra or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# --- this machine ------------------------------------------------------------------------------


def test_detect_this_machine_fills_typed_fields() -> None:
    start = time.perf_counter()
    info = detect()
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0  # a sanity bound only; the 0.5 s target is measured, not asserted

    assert isinstance(info.cpu.arch, str) and info.cpu.arch
    assert isinstance(info.cpu.logical_cores, int) and info.cpu.logical_cores >= 1
    assert isinstance(info.cpu.physical_cores, int)
    assert 1 <= info.cpu.physical_cores <= info.cpu.logical_cores
    assert info.cpu.performance_cores is not None and info.cpu.efficiency_cores is not None
    assert info.cpu.performance_cores + info.cpu.efficiency_cores == info.cpu.physical_cores
    assert all(isinstance(f, str) for f in info.cpu.flags)
    assert isinstance(info.memory.total_bytes, int) and info.memory.total_bytes > 0
    assert isinstance(info.memory.available_bytes, int)
    assert 0 < info.memory.available_bytes <= info.memory.total_bytes
    assert isinstance(info.memory.swap_total_bytes, int)
    assert isinstance(info.os.system, str) and isinstance(info.os.python, str)
    assert all(isinstance(g, GpuInfo) for g in info.gpus)
    assert all(isinstance(b, Availability) for b in info.backends)
    assert {b.name for b in info.backends} >= {"llama.cpp"}
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.notes.items())
    # Every None field of the CPU and memory has its reason.
    for section, obj in (("cpu", info.cpu), ("memory", info.memory)):
        for key, value in vars(obj).items():
            if value is None:
                assert f"{section}.{key}" in info.notes or section in info.notes


def test_detect_this_machine_round_trips_through_json() -> None:
    info = detect()
    data = json.loads(json.dumps(info.to_dict()))
    assert DeviceInfo.from_dict(data) == info


def test_detect_can_skip_backend_probes() -> None:
    info = detect(probe_backends=False)
    assert info.backends == ()
    assert info.notes["backends"] == "not probed"
    assert "not probed" in format_device(info)


# --- fixture machines --------------------------------------------------------------------------


def test_raspberry_pi_5(tmp_path: Path) -> None:
    root = machine("pi5-8gb", tmp_path,
                   {"sys/devices/platform/soc/soc:firmware/get_throttled": "50005\n"})  # fmt: skip
    info = detect(root)
    assert info.board == BoardInfo(model="Raspberry Pi 5 Model B Rev 1.0", family="raspberry-pi")
    assert info.cpu.model == "Cortex-A76"
    assert info.cpu.vendor == "Arm"
    assert info.cpu.arch == "aarch64"
    assert (info.cpu.physical_cores, info.cpu.logical_cores) == (4, 4)
    assert (info.cpu.performance_cores, info.cpu.efficiency_cores) == (4, 0)
    assert info.cpu.max_freq_mhz == 2400.0
    assert {"neon", "dotprod", "fp16"} <= set(info.cpu.flags)
    assert not {"i8mm", "sve", "avx2"} & set(info.cpu.flags)
    assert info.memory.total_bytes == 8245984 * 1024
    assert info.memory.available_bytes == 7130112 * 1024
    assert info.memory.swap_total_bytes == 524272 * 1024
    assert info.thermal.temperature_c == pytest.approx(52.1)
    assert info.thermal.throttled is True
    assert info.thermal.throttle_flags == (
        "under-voltage", "throttled", "under-voltage-occurred", "throttled-occurred",
    )  # fmt: skip
    assert info.os.distro == "Debian GNU/Linux 12 (bookworm)"
    assert info.os.release == "6.6.51+rpt-rpi-2712"
    assert info.gpus == ()


def test_raspberry_pi_4_model_from_cpuinfo_without_device_tree(tmp_path: Path) -> None:
    info = detect(machine("pi4-2gb", tmp_path))
    assert info.board.model == "Raspberry Pi 4 Model B Rev 1.5"
    assert info.board.family == "raspberry-pi"
    assert info.cpu.model == "Cortex-A72"
    assert info.cpu.flags == ("neon",)  # the A72 has no dot-product, fp16 arithmetic or i8mm
    assert info.cpu.max_freq_mhz == 1800.0
    assert info.memory.total_bytes is not None and info.memory.total_bytes < 2 * GIB
    # No firmware file and no vcgencmd (detection from a root never runs programs).
    assert info.thermal.throttled is None
    assert "thermal.throttled" in info.notes


def test_jetson_orin_nano(tmp_path: Path) -> None:
    info = detect(machine("jetson-orin-nano-8gb", tmp_path))
    assert info.board.family == "jetson"
    assert info.board.release == "R36.4.0"
    assert "Jetson Orin Nano" in (info.board.model or "")
    assert info.cpu.model == "Cortex-A78AE"
    assert (info.cpu.physical_cores, info.cpu.performance_cores) == (6, 6)
    assert info.cpu.max_freq_mhz == pytest.approx(1510.4)
    (gpu,) = info.gpus
    assert (gpu.vendor, gpu.api, gpu.compute_capability) == ("nvidia", "cuda", "8.7")
    assert gpu.unified_memory and gpu.memory_total_bytes == info.memory.total_bytes
    assert gpu.name == "Jetson Orin Nano integrated GPU"
    # The junction sensor (tj-thermal) is the hottest CPU-side zone; the bogus cv0 zone is ignored.
    assert info.thermal.temperature_c == pytest.approx(49.125)
    assert info.os.distro == "Ubuntu 22.04.5 LTS"


def test_x86_hybrid_laptop(tmp_path: Path) -> None:
    info = detect(machine("x86-laptop-16gb", tmp_path))
    assert info.cpu.model == "12th Gen Intel(R) Core(TM) i7-1260P"
    assert info.cpu.vendor == "GenuineIntel"
    assert info.cpu.arch == "x86_64"
    assert (info.cpu.physical_cores, info.cpu.logical_cores) == (12, 16)
    assert (info.cpu.performance_cores, info.cpu.efficiency_cores) == (4, 8)
    assert info.cpu.max_freq_mhz == 4700.0
    assert {"sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx_vnni"} <= set(info.cpu.flags)
    assert not any(f.startswith("avx512") for f in info.cpu.flags)
    assert info.board == BoardInfo(model="LENOVO 21AH", family="pc", chassis="laptop")
    assert info.thermal.temperature_c == 55.0  # x86_pkg_temp, not the ACPI zone


def test_arm_big_little_from_cpufreq_clusters(tmp_path: Path) -> None:
    # An RK3588-style board: cpu0-3 Cortex-A55 at 1.8 GHz, cpu4-7 Cortex-A76 at 2.4 GHz.
    blocks = []
    for i in range(8):
        part = "0xd05" if i < 4 else "0xd0b"
        blocks.append(f"processor\t: {i}\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"
                      f"CPU architecture: 8\nCPU part\t: {part}\n")  # fmt: skip
        freq = tmp_path / f"sys/devices/system/cpu/cpu{i}/cpufreq/cpuinfo_max_freq"
        freq.parent.mkdir(parents=True)
        freq.write_text("1800000\n" if i < 4 else "2400000\n")
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_text("\n".join(blocks))
    info = detect(tmp_path)
    assert info.cpu.model == "Cortex-A55 + Cortex-A76"
    assert (info.cpu.physical_cores, info.cpu.performance_cores, info.cpu.efficiency_cores) == (8, 4, 4)
    assert info.cpu.max_freq_mhz == 2400.0
    assert "8 cores (4P + 4E)" in format_device(info)


def test_nvidia_gpu_named_from_proc_when_nvml_is_not_consulted(tmp_path: Path) -> None:
    root = machine("x86-laptop-16gb", tmp_path, {
        "proc/driver/nvidia/gpus/0000:01:00.0/information":
            "Model: \t\t NVIDIA GeForce RTX 4060 Laptop GPU\nIRQ:   \t\t 186\nBus Type: \t PCIe\n",
    })  # fmt: skip
    info = detect(root)
    (gpu,) = info.gpus
    assert (gpu.vendor, gpu.name, gpu.api) == ("nvidia", "NVIDIA GeForce RTX 4060 Laptop GPU", "cuda")
    assert gpu.memory_total_bytes is None
    assert "VRAM" in info.notes["gpus"]
    assert "VRAM unknown" in format_device(info)


def test_empty_root_fails_soft(tmp_path: Path) -> None:
    info = detect(tmp_path)
    assert info.cpu.model is None and info.cpu.logical_cores is None
    assert info.memory == MemoryInfo()
    assert info.board.model is None and info.thermal.temperature_c is None
    for key in ("cpu.flags", "cpu.logical_cores", "memory", "board.model", "thermal.temperature_c"):
        assert key in info.notes
    text = format_device(info)
    assert "Memory    unknown (neither psutil nor /proc/meminfo could be read)" in text


def test_garbage_files_fail_soft(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/cpuinfo").write_bytes(b"\xff\xfe processor : x\n\n:::\n")
    (tmp_path / "proc/meminfo").write_text("MemTotal: lots\n")
    zone = tmp_path / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("hot\n")
    info = detect(tmp_path)
    assert info.memory.total_bytes is None
    assert info.thermal.temperature_c is None
    json.dumps(info.to_dict())


def test_fixture_machines_round_trip_through_json(tmp_path: Path) -> None:
    for name in ("pi5-8gb", "pi4-2gb", "jetson-orin-nano-8gb", "x86-laptop-16gb"):
        info = detect(machine(name, tmp_path))
        assert DeviceInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info


def test_from_dict_tolerates_missing_and_unknown_keys() -> None:
    assert DeviceInfo.from_dict({}) == DeviceInfo()
    info = DeviceInfo.from_dict({"cpu": {"arch": "aarch64", "flags": ["neon"], "future": 1}})
    assert info.cpu == CpuInfo(arch="aarch64", flags=("neon",))


# --- parsers -----------------------------------------------------------------------------------


def test_parse_throttled() -> None:
    assert parse_throttled("throttled=0x0\n") == (False, ())
    assert parse_throttled("0x50000") == (False, ("under-voltage-occurred", "throttled-occurred"))
    assert parse_throttled("e0008") == (
        True, ("soft-temperature-limit", "frequency-capped-occurred", "throttled-occurred",
               "soft-temperature-limit-occurred"),
    )  # fmt: skip


def test_parse_small_formats() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_tegra_release("# R35 (release), REVISION: 4.1, GCID: 33958178") == "R35.4.1"
    assert parse_tegra_release("garbage") is None
    assert parse_sysctl("hw.physicalcpu: 8\nhw.optional.arm.FEAT_I8MM: 1\n") == {
        "hw.physicalcpu": "8", "hw.optional.arm.FEAT_I8MM": "1",
    }  # fmt: skip
    assert cpu_features(["fp", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16"]) == (
        "bf16", "dotprod", "i8mm", "neon", "sve", "sve2",
    )  # fmt: skip
    assert cpu_features(["pni", "avx512f", "avx512_vnni", "lm"]) == ("avx512_vnni", "avx512f", "sse3")
    # Kernels before 3.14 have no MemAvailable: free + cached stands in.
    old_kernel = parse_meminfo("MemTotal: 100 kB\nMemFree: 10 kB\nCached: 20 kB\n")
    assert old_kernel["available_bytes"] == 30 * 1024


def test_parse_cpuinfo_armv7_pi4() -> None:
    text = ("processor\t: 0\nmodel name\t: ARMv7 Processor rev 3 (v7l)\nFeatures\t: half thumb "
            "fastmult vfp edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm crc32\n"
            "CPU implementer\t: 0x41\nCPU architecture: 7\nCPU part\t: 0xd08\n\n"
            "Hardware\t: BCM2711\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n")  # fmt: skip
    processors, machine_block = parse_cpuinfo(text)
    assert len(processors) == 1
    assert cpu_features(processors[0]["Features"].split()) == ("neon",)
    assert machine_block["Model"] == "Raspberry Pi 4 Model B Rev 1.4"


# --- the human table ---------------------------------------------------------------------------


def test_format_device_pi5_matches_the_issue_layout() -> None:
    info = DeviceInfo(
        cpu=CpuInfo(model="Cortex-A76", arch="aarch64", physical_cores=4, logical_cores=4,
                    performance_cores=4, efficiency_cores=0, max_freq_mhz=2400.0,
                    flags=("dotprod", "fp16", "neon")),  # fmt: skip
        memory=MemoryInfo(total_bytes=int(7.9 * GIB), available_bytes=int(6.8 * GIB),
                          swap_total_bytes=GIB // 2, swap_free_bytes=GIB // 2),  # fmt: skip
        board=BoardInfo(model="Raspberry Pi 5 Model B Rev 1.0", family="raspberry-pi"),
        thermal=ThermalInfo(temperature_c=52.1, throttled=False),
        backends=(
            Availability("llama.cpp", True, version="0.3.16", devices=("CPU",)),
            Availability("tflite", False, reason="No module named 'ai_edge_litert'"),
        ),
    )
    lines = format_device(info, "raspberry-pi-5-8gb").splitlines()
    assert "Board     Raspberry Pi 5 Model B Rev 1.0" in lines
    assert "CPU       Cortex-A76 ×4 (aarch64) · NEON dotprod · 2.4 GHz" in lines
    assert "Memory    7.9 GiB total · 6.8 GiB available · swap 0.5 GiB" in lines
    assert "GPU       none usable for LLM inference" in lines
    assert "Thermal   52.1 °C · not throttled" in lines
    assert "Backends  llama.cpp 0.3.16 (CPU) · tflite missing" in lines
    assert lines[-1] == "Profile   raspberry-pi-5-8gb"


def test_format_device_gpu_and_throttle_history() -> None:
    info = DeviceInfo(
        gpus=(GpuInfo(vendor="nvidia", name="NVIDIA GeForce RTX 4060 Laptop GPU", api="cuda",
                      memory_total_bytes=8 * GIB, memory_free_bytes=7 * GIB,
                      compute_capability="8.9"),),  # fmt: skip
        thermal=ThermalInfo(temperature_c=70.0, throttled=False,
                            throttle_flags=("under-voltage-occurred",)),  # fmt: skip
    )
    text = format_device(info)
    gpu_line = "NVIDIA GeForce RTX 4060 Laptop GPU · CUDA · 8.0 GiB VRAM (7.0 GiB free) · compute 8.9"
    assert gpu_line in text
    assert "70.0 °C · not throttled · since boot: under-voltage" in text
    assert "Profile" not in text


def test_device_info_is_hashable_for_caches(tmp_path: Path) -> None:
    info = detect(machine("pi5-8gb", tmp_path))
    assert hash(info) == hash(DeviceInfo.from_dict(info.to_dict()))


def test_unreadable_throttle_flags_keep_the_temperature(tmp_path: Path) -> None:
    root = machine("pi5-8gb", tmp_path,
                   {"sys/devices/platform/soc/soc:firmware/get_throttled": "not hex\n"})  # fmt: skip
    info = detect(root)
    assert info.thermal.temperature_c == pytest.approx(52.1)
    assert info.thermal.throttled is None
    assert "not hex" in info.notes["thermal.throttled"]
