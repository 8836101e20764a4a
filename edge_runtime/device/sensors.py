"""What the bench reads from the machine besides time: temperature, energy, peak RSS, VRAM.

Every reader fails soft: a value it cannot read is ``None`` with a reason, never an exception,
because a missing sensor must not cost the user their benchmark.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")


def load_average() -> float | None:
    """The system's 1-minute load average (runnable threads), or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def cpu_temperature_c() -> float | None:
    """The CPU temperature now, as ``edgert device`` reads it (thermal zones, then psutil)."""
    from edge_runtime.device.readers import SystemFiles, read_thermal

    try:
        return read_thermal(SystemFiles(Path("/")), True, {}).get("temperature_c")
    except Exception:
        return None


class EnergyCounter:
    """Intel RAPL package energy (``intel-rapl:N/energy_uj``), summed over CPU packages.

    AMD Zen exposes the same files. RAPL counts the whole package, other programs included, so
    figures are meaningful on a quiet machine. Since 2020 kernels make ``energy_uj`` readable by
    root only; then ``available`` is False and ``reason`` says so.
    """

    def __init__(self, root: Path = POWERCAP) -> None:
        self.domains: list[tuple[Path, int]] = []  # (energy_uj file, wrap-around range)
        self.reason: str | None = None
        # Top-level domains only (intel-rapl:0, not intel-rapl:0:0): subdomains are part of them.
        found = sorted(p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1) if root.is_dir() else []
        if not found:
            self.reason = "no RAPL power counter (/sys/class/powercap/intel-rapl:*)"
            return
        for domain in found:
            energy = domain / "energy_uj"
            try:
                int(energy.read_text())
                span = int((domain / "max_energy_range_uj").read_text())
            except PermissionError:
                self.reason = f"{energy} is readable by root only"
                self.domains = []
                return
            except (OSError, ValueError) as exc:
                self.reason = f"{energy}: {exc}"
                self.domains = []
                return
            self.domains.append((energy, span))

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def read_uj(self) -> list[int] | None:
        """The current counter of each domain in microjoules, or None when unreadable."""
        try:
            return [int(path.read_text()) for path, _ in self.domains]
        except (OSError, ValueError):
            return None

    def joules_between(self, before: list[int] | None, after: list[int] | None) -> float | None:
        """Energy used between two readings, allowing for each counter wrapping once."""
        if before is None or after is None or len(before) != len(self.domains):
            return None
        total = 0
        for (_, span), a, b in zip(self.domains, before, after, strict=True):
            total += b - a if b >= a else b + span - a
        return total / 1e6


def rss_now_bytes() -> int | None:
    """This process's resident memory now."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:
        return None


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory since it started (the kernel's high-water mark).

    On Linux this is ``VmHWM`` of /proc/self/status, not ``ru_maxrss``: the kernel carries the
    forking parent's high-water mark into ``ru_maxrss`` across exec, so a spawned child would
    report at least its parent's peak (measured: 629 MiB in a child whose own peak was 31 MiB).
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS bytes, Linux KiB
    except ImportError:  # Windows: the working set's peak
        try:
            import psutil

            return int(getattr(psutil.Process().memory_info(), "peak_wset", 0)) or None
        except Exception:
            return None


class VramProbe:
    """GPU memory this process holds, through NVML (NVIDIA); sampled, so a peak between
    samples can be missed, though llama.cpp allocates its buffers at load and holds them."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.peak: int | None = None
        self._handles: list[object] = []
        try:
            import pynvml  # nvidia-ml-py, the `nvidia` extra

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except ImportError:
            self.reason = "no NVML (nvidia-ml-py not installed)"
        except Exception as exc:
            self.reason = f"NVML unavailable: {exc}"
        if not self._handles and self.reason is None:
            self.reason = "no NVIDIA GPU"

    def sample(self) -> None:
        """Record this process's VRAM use now (the maximum is kept in ``peak``)."""
        if not self._handles:
            return
        used = 0
        pid = os.getpid()
        try:
            for handle in self._handles:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid and proc.usedGpuMemory:
                        used += int(proc.usedGpuMemory)
        except Exception as exc:
            self.reason = f"NVML query failed: {exc}"
            return
        self.peak = max(self.peak or 0, used)
