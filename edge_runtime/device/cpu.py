"""CPU detection for ``device.detect()``: model, architecture, core kinds, clocks, SIMD features.

Linux answers through /proc/cpuinfo and sysfs (read via ``SystemFiles`` so tests can use
fixture files); macOS through one ``sysctl`` call. Like every reader it fails soft: what it cannot
read is left out and explained in ``notes``.
"""

from __future__ import annotations

import platform
import re
import subprocess
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edge_runtime.device.readers import SystemFiles

Fields = dict[str, Any]

_ARCH_ALIASES = {
    "amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "i686": "x86", "i386": "x86",
}  # fmt: skip

# /proc/cpuinfo flag → canonical feature name, for the features llama.cpp, XNNPACK and
# onnxruntime pick kernels by. x86 calls SSE3 "pni"; Arm calls NEON "asimd" on aarch64.
_X86_FEATURES = {
    "pni": "sse3", "ssse3": "ssse3", "sse4_1": "sse4_1", "sse4_2": "sse4_2", "avx": "avx",
    "avx2": "avx2", "f16c": "f16c", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512vl": "avx512vl", "avx512vbmi": "avx512vbmi", "avx512_vnni": "avx512_vnni",
    "avx512_bf16": "avx512_bf16", "avx_vnni": "avx_vnni", "amx_int8": "amx_int8",
}  # fmt: skip
_ARM_FEATURES = {
    "neon": "neon", "asimd": "neon", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve",
    "sve2": "sve2", "asimdhp": "fp16", "bf16": "bf16",
}  # fmt: skip
# macOS sysctl names for the same features.
_MAC_FEATURES = {
    "hw.optional.neon": "neon", "hw.optional.arm.FEAT_DotProd": "dotprod",
    "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_FP16": "fp16",
    "hw.optional.arm.FEAT_BF16": "bf16", "hw.optional.avx1_0": "avx", "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma", "hw.optional.sse3": "sse3", "hw.optional.avx512f": "avx512f",
}  # fmt: skip

# Arm "CPU part" ids (implementer 0x41) of the cores found on boards we target.
_ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd42": "Cortex-A78AE", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2", "0xd49": "Neoverse-N2", "0xd4b": "Cortex-A78C", "0xd4d": "Cortex-A715",
    "0xd4e": "Cortex-X3", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
    "0xd82": "Cortex-X4", "0xd87": "Cortex-A725", "0xc07": "Cortex-A7", "0xc0f": "Cortex-A15",
}  # fmt: skip
_ARM_IMPLEMENTERS = {"0x41": "Arm", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple"}

def normalize_arch(machine: str) -> str:
    """One spelling per architecture: ``x86_64``, ``aarch64``, ``armv7l`` ..."""
    m = machine.strip()
    return _ARCH_ALIASES.get(m.lower(), m.lower())


def parse_cpu_list(text: str) -> list[int]:
    """Parse a kernel CPU list such as ``0-3,8,10-11``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def parse_cpuinfo(text: str) -> tuple[list[dict[str, str]], dict[str, str]]:
    """Split /proc/cpuinfo into per-processor blocks and the trailing machine block (Pi: Model)."""
    processors: list[dict[str, str]] = []
    machine: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", text):
        entries: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entries[key.strip()] = value.strip()
        if "processor" in entries and entries["processor"].isdigit():
            processors.append(entries)
        elif entries:
            machine.update(entries)
    return processors, machine


def cpu_features(raw_flags: Iterable[str]) -> tuple[str, ...]:
    """Canonical SIMD feature names from raw cpuinfo flags (x86 ``flags``, Arm ``Features``)."""
    found = set()
    for flag in raw_flags:
        name = _X86_FEATURES.get(flag) or _ARM_FEATURES.get(flag)
        if name:
            found.add(name)
    return tuple(sorted(found))


def _arm_model(processors: list[dict[str, str]]) -> str | None:
    names: list[str] = []
    for p in processors:
        impl, part = p.get("CPU implementer", "").lower(), p.get("CPU part", "").lower()
        if not part:
            continue
        name = _ARM_PARTS.get(part) if impl == "0x41" else None
        name = name or f"{_ARM_IMPLEMENTERS.get(impl, impl or 'Arm')} part {part}"
        if name not in names:
            names.append(name)
    return " + ".join(names) or None


def _arch_from_cpuinfo(processors: list[dict[str, str]]) -> str | None:
    first = processors[0] if processors else {}
    if "CPU architecture" in first:
        return "aarch64" if first["CPU architecture"].strip() == "8" else "armv7l"
    if "vendor_id" in first:
        return "x86_64" if " lm " in f" {first.get('flags', '')} " else "x86"
    return None


def read_cpu(files: SystemFiles, live: bool, notes: dict[str, str]) -> Fields:
    """CPU model, vendor, arch, core counts, max clock and SIMD features."""
    if live and sys.platform == "darwin":
        return _read_cpu_macos(notes)
    out: Fields = {}
    processors, _ = parse_cpuinfo(files.text("/proc/cpuinfo") or "")
    if not processors:
        notes["cpu.flags"] = "no readable /proc/cpuinfo"
    first = processors[0] if processors else {}
    out["model"] = first.get("model name") if "vendor_id" in first else _arm_model(processors)
    if not out["model"]:
        out["model"] = first.get("model name") or (platform.processor() if live else None) or None
    impl = first.get("CPU implementer", "").lower()
    out["vendor"] = first.get("vendor_id") or _ARM_IMPLEMENTERS.get(impl) or None
    out["arch"] = normalize_arch(platform.machine()) if live else _arch_from_cpuinfo(processors)
    raw = (first.get("flags") or first.get("Features") or "").split()
    out["flags"] = cpu_features(raw)
    if live and not processors:
        notes["cpu.flags"] = f"SIMD features are not readable on {platform.system()}"
    out.update(_read_cores(files, live, processors, notes))
    out["max_freq_mhz"] = _read_max_freq(files, live, notes)
    return {k: v for k, v in out.items() if v is not None}


def _read_cores(
    files: SystemFiles, live: bool, processors: list[dict[str, str]], notes: dict[str, str]
) -> Fields:
    cpus = [int(p["processor"]) for p in processors]
    if not cpus:
        online = files.text("/sys/devices/system/cpu/online")
        cpus = parse_cpu_list(online) if online else []
    if not cpus and live:
        import os

        cpus = list(range(os.cpu_count() or 0))
    if not cpus:
        notes["cpu.logical_cores"] = "no CPU list in /proc/cpuinfo or sysfs"
        return {}
    by_cpu = {int(p["processor"]): p for p in processors}
    core_of: dict[int, str] = {}
    for cpu in cpus:
        # Hardware threads of one core share a sibling list; that key counts physical cores.
        siblings = files.first_value(
            f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list",
            f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list",
        )
        p = by_cpu.get(cpu, {})
        if siblings:
            core_of[cpu] = siblings
        elif "core id" in p:
            core_of[cpu] = f"{p.get('physical id', '0')}/{p['core id']}"
        else:
            core_of[cpu] = str(cpu)  # no topology: count each CPU as a core (true on Arm SoCs)
    physical = len(set(core_of.values()))
    if live and not processors:
        # No /proc/cpuinfo (Windows): psutil knows the physical count, not the core kinds.
        try:
            import psutil

            physical = psutil.cpu_count(logical=False) or physical
        except Exception:
            pass
        return {"logical_cores": len(cpus), "physical_cores": physical,
                "performance_cores": physical, "efficiency_cores": 0}  # fmt: skip
    perf_cpus, eff_cpus = _split_core_kinds(files, cpus, by_cpu)
    performance = len({core_of[c] for c in perf_cpus if c in core_of})
    efficiency = len({core_of[c] for c in eff_cpus if c in core_of})
    return {
        "logical_cores": len(cpus),
        "physical_cores": physical,
        "performance_cores": performance or physical,
        "efficiency_cores": efficiency,
    }


def _split_core_kinds(
    files: SystemFiles, cpus: list[int], by_cpu: dict[int, dict[str, str]]
) -> tuple[list[int], list[int]]:
    # Intel hybrid CPUs name their kinds in sysfs (perf PMUs cpu_core / cpu_atom).
    p_list = files.first_value("/sys/devices/cpu_core/cpus")
    e_list = files.first_value("/sys/devices/cpu_atom/cpus")
    if p_list and e_list:
        return parse_cpu_list(p_list), parse_cpu_list(e_list)
    # Arm big.LITTLE: clusters differ in maximum clock; the slowest cluster is "efficiency".
    freqs = {}
    for cpu in cpus:
        text = files.first_value(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq")
        if text and text.isdigit():
            freqs[cpu] = int(text)
    if len(set(freqs.values())) > 1:
        low = min(freqs.values())
        big = [c for c in cpus if freqs.get(c, low) > low]
        return big, [c for c in cpus if freqs.get(c) == low]
    # No clocks: different Arm core parts still tell the clusters apart (A76 + A55 ...).
    parts = {c: by_cpu.get(c, {}).get("CPU part") for c in cpus}
    if len({p for p in parts.values() if p}) > 1:
        little = {"0xd03", "0xd04", "0xd05", "0xd46", "0xd80", "0xc07"}
        return [c for c in cpus if parts[c] not in little], [c for c in cpus if parts[c] in little]
    return cpus, []


def _read_max_freq(files: SystemFiles, live: bool, notes: dict[str, str]) -> float | None:
    values = []
    for path in files.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            values.append(int(text) / 1000)  # kHz → MHz
    if values:
        return max(values)
    if live:
        try:
            import psutil

            freq = psutil.cpu_freq()
            if freq and freq.max:
                return float(freq.max)
        except Exception:
            pass
    notes["cpu.max_freq_mhz"] = "no cpufreq data (common in virtual machines)"
    return None


def run_sysctl(keys: list[str]) -> dict[str, str]:
    """``sysctl`` values by key (macOS); one call, missing keys are simply left out."""
    proc = subprocess.run(["sysctl", *keys], capture_output=True, text=True, timeout=2)
    return parse_sysctl(proc.stdout)


def parse_sysctl(text: str) -> dict[str, str]:
    """Parse ``sysctl key...`` output (``key: value`` lines)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _read_cpu_macos(notes: dict[str, str]) -> Fields:
    keys = [
        "machdep.cpu.brand_string", "hw.physicalcpu", "hw.logicalcpu", "hw.perflevel0.physicalcpu",
        "hw.perflevel1.physicalcpu", "hw.cpufrequency_max", "machdep.cpu.features",
        "machdep.cpu.leaf7_features", *_MAC_FEATURES,
    ]  # fmt: skip
    s = run_sysctl(keys)
    flags = {name for key, name in _MAC_FEATURES.items() if s.get(key) == "1"}
    legacy = f"{s.get('machdep.cpu.features', '')} {s.get('machdep.cpu.leaf7_features', '')}"
    flags |= {name for word in legacy.lower().split() for name in [_X86_FEATURES.get(word)] if name}
    flags |= {"avx" for word in legacy.split() if word == "AVX1.0"}
    physical = int(s["hw.physicalcpu"]) if s.get("hw.physicalcpu", "").isdigit() else None
    perf = s.get("hw.perflevel0.physicalcpu", "")
    eff = s.get("hw.perflevel1.physicalcpu", "")
    freq = s.get("hw.cpufrequency_max", "")
    if not freq.isdigit():
        notes["cpu.max_freq_mhz"] = "macOS on Apple silicon does not report CPU clocks"
    out: Fields = {
        "model": s.get("machdep.cpu.brand_string"),
        "vendor": "Apple" if platform.machine() == "arm64" else None,
        "arch": normalize_arch(platform.machine()),
        "physical_cores": physical,
        "logical_cores": int(s["hw.logicalcpu"]) if s.get("hw.logicalcpu", "").isdigit() else None,
        "performance_cores": int(perf) if perf.isdigit() else physical,
        "efficiency_cores": int(eff) if eff.isdigit() else 0,
        "max_freq_mhz": int(freq) / 1e6 if freq.isdigit() else None,
        "flags": tuple(sorted(flags)),
    }
    return {k: v for k, v in out.items() if v is not None}
