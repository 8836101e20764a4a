"""The readers behind ``device.detect()``: /proc, /sys, sysctl, psutil and NVML, each failing soft.

Each ``read_*`` returns a dict of dataclass fields for ``device.py`` to build; a value it cannot
read is left out (so it stays ``None``) and its reason goes into ``notes``. File reads go through
``SystemFiles`` so that a test can point them at a folder of fixture files. ``live`` says whether
the files are this machine's own; only then are psutil, NVML, sysctl and vcgencmd consulted.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_runtime.device.cpu import parse_cpuinfo, run_sysctl

Fields = dict[str, Any]

# DMI chassis_type codes (SMBIOS spec, table 17) grouped into what matters for a profile.
_CHASSIS = {
    3: "desktop", 4: "desktop", 6: "desktop", 7: "desktop", 8: "laptop", 9: "laptop",
    10: "laptop", 13: "desktop", 14: "laptop", 17: "server", 23: "server", 30: "tablet",
    31: "laptop", 32: "laptop", 35: "desktop", 36: "desktop",
}  # fmt: skip

# Raspberry Pi firmware get_throttled bits (documented under `vcgencmd get_throttled`).
_THROTTLE_BITS = {
    0: "under-voltage", 1: "frequency-capped", 2: "throttled", 3: "soft-temperature-limit",
    16: "under-voltage-occurred", 17: "frequency-capped-occurred", 18: "throttled-occurred",
    19: "soft-temperature-limit-occurred",
}  # fmt: skip

# CUDA compute capability of Jetson integrated GPUs, by the module name in the device tree.
_JETSON_CC = (("Orin", "8.7"), ("Xavier", "7.2"), ("TX2", "6.2"), ("Nano", "5.3"), ("TX1", "5.3"))


class SystemFiles:
    """Reads system files under a root folder (``/`` on the live machine, a fixture in tests)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        """The path of absolute system path ``name`` under the root."""
        return self.root / name.lstrip("/")

    def text(self, name: str) -> str | None:
        """The file's text, or None when it is missing or unreadable."""
        try:
            return self.path(name).read_text(errors="replace")
        except OSError:
            return None

    def first_value(self, *names: str) -> str | None:
        """The first non-empty stripped content among ``names`` (device-tree strings end in NUL)."""
        for name in names:
            text = self.text(name)
            if text is not None and text.strip("\x00 \n"):
                return text.strip("\x00 \n")
        return None

    def glob(self, pattern: str) -> list[Path]:
        """Paths matching ``pattern`` (absolute-style) under the root, sorted."""
        try:
            return sorted(self.root.glob(pattern.lstrip("/")))
        except OSError:
            return []


def parse_meminfo(text: str) -> Fields:
    """RAM and swap in bytes from /proc/meminfo."""
    kib = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kib[key.strip()] = int(parts[0]) * 1024
    out = {
        "total_bytes": kib.get("MemTotal"),
        # Kernels before 3.14 lack MemAvailable; free + page cache is the old estimate.
        "available_bytes": kib.get("MemAvailable", kib.get("MemFree", 0) + kib.get("Cached", 0))
        if "MemTotal" in kib
        else None,
        "swap_total_bytes": kib.get("SwapTotal"),
        "swap_free_bytes": kib.get("SwapFree"),
    }
    return {k: v for k, v in out.items() if v is not None}


def read_memory(files: SystemFiles, live: bool, notes: dict[str, str]) -> Fields:
    """RAM total/available and swap: psutil on the live machine, /proc/meminfo otherwise."""
    if live:
        try:
            import psutil

            vm, sw = psutil.virtual_memory(), psutil.swap_memory()
            return {
                "total_bytes": int(vm.total),
                "available_bytes": int(vm.available),
                "swap_total_bytes": int(sw.total),
                "swap_free_bytes": int(sw.free),
            }
        except Exception as exc:
            notes["memory.psutil"] = f"psutil failed ({exc}); read /proc/meminfo"
    text = files.text("/proc/meminfo")
    if text is None:
        notes["memory"] = "neither psutil nor /proc/meminfo could be read"
        return {}
    return parse_meminfo(text)


def parse_tegra_release(text: str) -> str | None:
    """``R36.3.0`` from /etc/nv_tegra_release (``# R36 (release), REVISION: 3.0, ...``)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else None


def read_board(files: SystemFiles, live: bool, notes: dict[str, str]) -> Fields:
    """Board model and family from the device tree, Jetson release file, DMI or sysctl."""
    model = files.first_value("/proc/device-tree/model", "/sys/firmware/devicetree/base/model")
    if model is None:
        _, machine = parse_cpuinfo(files.text("/proc/cpuinfo") or "")
        model = machine.get("Model")  # Raspberry Pi kernels repeat the model here
    tegra = files.text("/etc/nv_tegra_release")
    out: Fields = {"release": parse_tegra_release(tegra) if tegra else None}
    if model and model.startswith("Raspberry Pi"):
        out["family"] = "raspberry-pi"
    elif tegra is not None or (model and "Jetson" in model):
        out["family"] = "jetson"
        model = model or f"NVIDIA Jetson (L4T {out['release'] or 'unknown release'})"
    if model is None:
        vendor = files.first_value("/sys/class/dmi/id/sys_vendor")
        product = files.first_value("/sys/class/dmi/id/product_name")
        if vendor or product:
            model = " ".join(x for x in (vendor, product) if x)
            out["family"] = "pc"
        chassis = files.first_value("/sys/class/dmi/id/chassis_type")
        if chassis and chassis.isdigit():
            out["chassis"] = _CHASSIS.get(int(chassis), "other")
    if model is None and live and sys.platform == "darwin":
        hw = run_sysctl(["hw.model"]).get("hw.model")
        if hw:
            model, out["family"] = f"Apple {hw}", "mac"
            out["chassis"] = "laptop" if "Book" in hw else None
    if model is None:
        notes["board.model"] = "no device-tree model, Jetson release file or DMI name"
    out["model"] = model
    return {k: v for k, v in out.items() if v is not None}


def parse_throttled(text: str) -> tuple[bool, tuple[str, ...]]:
    """Decode the Pi firmware's throttled bit mask (``throttled=0x50005`` or a bare hex number)."""
    value = int(text.strip().removeprefix("throttled=").strip(), 16)
    flags = tuple(name for bit, name in _THROTTLE_BITS.items() if value & (1 << bit))
    return bool(value & 0xF), flags


def read_thermal(files: SystemFiles, live: bool, notes: dict[str, str]) -> Fields:
    """CPU temperature (thermal zones, then psutil) and the Pi's throttling flags."""
    out: Fields = {}
    zones = []
    for zone in files.glob("/sys/class/thermal/thermal_zone*"):
        try:
            temp = int((zone / "temp").read_text().strip()) / 1000  # millidegrees
            kind = (zone / "type").read_text().strip() if (zone / "type").exists() else ""
        except (OSError, ValueError):
            continue
        zones.append((kind, temp))
    # Prefer the zone that measures the CPU; otherwise the hottest one is the honest answer.
    cpu_zones = [t for k, t in zones if re.search(r"cpu|x86_pkg|soc|tj", k, re.I)]
    if cpu_zones or zones:
        out["temperature_c"] = max(cpu_zones or [t for _, t in zones])
    elif live:
        out["temperature_c"] = _psutil_temperature()
    if out.get("temperature_c") is None:
        notes["thermal.temperature_c"] = "no readable thermal sensor"
    raw = None
    for path in files.glob("/sys/devices/platform/soc*/*firmware/get_throttled"):
        try:
            raw = path.read_text()
            break
        except OSError:
            continue
    if raw is None and live and shutil.which("vcgencmd"):
        try:
            proc = subprocess.run(
                ["vcgencmd", "get_throttled"], capture_output=True, text=True, timeout=2
            )
            raw = proc.stdout if proc.returncode == 0 else None
        except (OSError, subprocess.SubprocessError) as exc:
            notes["thermal.throttled"] = f"vcgencmd failed: {exc}"
    try:
        if raw:
            out["throttled"], out["throttle_flags"] = parse_throttled(raw)
    except ValueError:
        notes["thermal.throttled"] = f"unreadable throttling flags {raw.strip()!r}"
    if "throttled" not in out:
        reason = "no firmware throttling flags (Raspberry Pi get_throttled)"
        notes.setdefault("thermal.throttled", reason)
    return {k: v for k, v in out.items() if v is not None}


def _psutil_temperature() -> float | None:
    try:
        import psutil

        sensors = psutil.sensors_temperatures()
    except Exception:
        return None
    for name in ("coretemp", "k10temp", "zenpower", "cpu_thermal", "acpitz"):
        readings = [r.current for r in sensors.get(name, []) if r.current]
        if readings:
            return float(max(readings))
    return None


def read_os(files: SystemFiles, live: bool, notes: dict[str, str]) -> Fields:
    """OS name, kernel release, distribution and Python version."""
    out: Fields = {"python": platform.python_version() if live else None}
    if live and sys.platform != "linux":
        out["system"], out["release"] = platform.system(), platform.release()
        mac = platform.mac_ver()[0]
        out["distro"] = f"macOS {mac}" if mac else None
        return {k: v for k, v in out.items() if v}
    out["system"] = "Linux"
    out["release"] = files.first_value("/proc/sys/kernel/osrelease")
    os_release = files.text("/etc/os-release") or files.text("/usr/lib/os-release") or ""
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', os_release, re.M)
    out["distro"] = m.group(1) if m else None
    if out["distro"] is None:
        notes["os.distro"] = "no /etc/os-release"
    return {k: v for k, v in out.items() if v}


def read_jetson_gpu(board_model: str | None, ram_total: int | None, ram_free: int | None) -> Fields:
    """The integrated GPU of a Jetson: CUDA on the shared RAM, capability from the module name."""
    model = board_model or "NVIDIA Jetson"
    cc = next((cc for key, cc in _JETSON_CC if key in model), None)
    module = re.sub(r"^NVIDIA\s+|\s+(Developer Kit|Engineering Reference).*$", "", model)
    return {
        "vendor": "nvidia",
        "name": f"{module} integrated GPU",
        "api": "cuda",
        "memory_total_bytes": ram_total,
        "memory_free_bytes": ram_free,
        "unified_memory": True,
        "compute_capability": cc,
    }


def read_nvidia_gpus(files: SystemFiles, live: bool, notes: dict[str, str]) -> list[Fields]:
    """Discrete NVIDIA GPUs through NVML (nvidia-ml-py); names from /proc when NVML is absent."""
    if live and sys.platform != "darwin":
        try:
            return _nvml_gpus()
        except ImportError:
            reason = "nvidia-ml-py is not installed"
        except Exception as exc:
            reason = f"NVML unavailable: {exc}"
    else:
        reason = "NVML not consulted"
    names = []
    for info in files.glob("/proc/driver/nvidia/gpus/*/information"):
        try:
            text = info.read_text(errors="replace")
        except OSError:
            continue
        m = re.search(r"^Model:\s*(.+)$", text, re.M)
        if m:
            names.append(m.group(1).strip())
    if names:
        notes["gpus"] = f"{reason}: VRAM and compute capability unknown"
        return [{"vendor": "nvidia", "name": n, "api": "cuda"} for n in names]
    if live:
        notes["gpus"] = "no NVIDIA driver found" if "not installed" in reason else reason
    return []


def _nvml_gpus() -> list[Fields]:
    import pynvml  # nvidia-ml-py; optional, imported only here

    pynvml.nvmlInit()
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                {
                    "vendor": "nvidia",
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "api": "cuda",
                    "memory_total_bytes": int(mem.total),
                    "memory_free_bytes": int(mem.free),
                    "compute_capability": f"{major}.{minor}",
                    "driver_version": driver.decode() if isinstance(driver, bytes) else str(driver),
                }
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()
