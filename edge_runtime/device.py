"""What this machine is: CPU, SIMD features, memory, GPUs, board, thermal state, OS, backends.

``detect()`` reads everything the planner needs in well under half a second, read-only, with
no heavy imports. Every reader fails soft: a value it cannot read is ``None`` and
``DeviceInfo.notes`` says why (keyed by the field's dotted path), so detection never raises.

File reads go through a root folder: ``detect(root=some_dir)`` reads ``some_dir/proc/cpuinfo``
and friends instead of the live files, which is how tests stand in for a Raspberry Pi or a
Jetson. With a root, nothing else about the running machine is consulted (no psutil, NVML,
sysctl or backend probes), so the result depends on the fixture files alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, TypeVar

from .backends.base import Availability
from .device_cpu import read_cpu
from .device_readers import (
    SystemFiles,
    read_board,
    read_jetson_gpu,
    read_memory,
    read_nvidia_gpus,
    read_os,
    read_thermal,
)

GIB = 1024**3

# Flags as format_device shows them; the order is roughly "how much it matters to llama.cpp".
_FLAG_LABELS = {
    "avx": "AVX", "avx2": "AVX2", "avx512f": "AVX-512", "f16c": "F16C", "fma": "FMA",
    "avx_vnni": "AVX-VNNI", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16",
    "amx_int8": "AMX", "neon": "NEON", "dotprod": "dotprod", "i8mm": "i8mm", "sve": "SVE",
    "sve2": "SVE2",
}  # fmt: skip


@dataclass(frozen=True)
class CpuInfo:
    """The CPU: model, architecture, core counts and the SIMD features the backends use.

    ``flags`` holds canonical lower-case names: x86 ``sse3 ssse3 sse4_1 sse4_2 avx avx2 f16c
    fma avx512f avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16 avx_vnni amx_int8``, Arm
    ``neon dotprod i8mm sve sve2 fp16 bf16``. ``performance_cores`` and ``efficiency_cores`` are
    physical cores; on a CPU whose cores are all alike every core counts as a performance core.
    """

    model: str | None = None
    vendor: str | None = None
    arch: str | None = None  # normalized: x86_64, aarch64, armv7l, ...
    physical_cores: int | None = None
    logical_cores: int | None = None
    performance_cores: int | None = None
    efficiency_cores: int | None = None
    max_freq_mhz: float | None = None
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class MemoryInfo:
    """System RAM and swap, in bytes."""

    total_bytes: int | None = None
    available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU usable for LLM inference (NVIDIA through CUDA, Apple silicon through Metal)."""

    vendor: str  # "nvidia", "apple"
    name: str
    api: str | None = None  # "cuda", "metal"
    memory_total_bytes: int | None = None  # VRAM, or the shared pool when unified
    memory_free_bytes: int | None = None
    unified_memory: bool = False  # shares system RAM (Apple silicon, Jetson)
    compute_capability: str | None = None  # CUDA only, "8.9"
    driver_version: str | None = None


@dataclass(frozen=True)
class BoardInfo:
    """The board or machine around the CPU, where the firmware names it."""

    model: str | None = None  # "Raspberry Pi 5 Model B Rev 1.0", "LENOVO 21AH ThinkPad T14"
    family: str | None = None  # "raspberry-pi", "jetson", "mac", "pc"
    release: str | None = None  # Jetson L4T release "R36.3.0"
    chassis: str | None = None  # "laptop", "desktop", "server", ... from DMI


@dataclass(frozen=True)
class ThermalInfo:
    """CPU temperature and, on a Raspberry Pi, the firmware's throttling flags."""

    temperature_c: float | None = None
    throttled: bool | None = None  # currently throttled or capped (Pi firmware)
    throttle_flags: tuple[str, ...] = ()  # e.g. "under-voltage", "throttled-occurred"


@dataclass(frozen=True)
class OsInfo:
    """Operating system and Python."""

    system: str | None = None  # "Linux", "Darwin", "Windows"
    release: str | None = None  # kernel release
    distro: str | None = None  # "Debian GNU/Linux 12 (bookworm)", "macOS 14.5"
    python: str | None = None


@dataclass(frozen=True)
class DeviceInfo:
    """Everything ``detect()`` learned about the machine; ``notes`` says why a value is None."""

    cpu: CpuInfo = field(default_factory=CpuInfo)
    memory: MemoryInfo = field(default_factory=MemoryInfo)
    gpus: tuple[GpuInfo, ...] = ()
    board: BoardInfo = field(default_factory=BoardInfo)
    thermal: ThermalInfo = field(default_factory=ThermalInfo)
    os: OsInfo = field(default_factory=OsInfo)
    backends: tuple[Availability, ...] = ()
    # Left out of the hash so a DeviceInfo can key a cache; still compared by ==.
    notes: dict[str, str] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceInfo:
        """Rebuild from ``to_dict()`` output; unknown keys are ignored, missing ones default."""
        backends = []
        for item in data.get("backends") or ():
            known = {f.name for f in fields(Availability)}
            kwargs = {k: v for k, v in item.items() if k in known}
            kwargs["devices"] = tuple(kwargs.get("devices") or ())
            backends.append(Availability(**kwargs))
        return cls(
            cpu=_build(CpuInfo, data.get("cpu")),
            memory=_build(MemoryInfo, data.get("memory")),
            gpus=tuple(_build(GpuInfo, g) for g in data.get("gpus") or ()),
            board=_build(BoardInfo, data.get("board")),
            thermal=_build(ThermalInfo, data.get("thermal")),
            os=_build(OsInfo, data.get("os")),
            backends=tuple(backends),
            notes=dict(data.get("notes") or {}),
        )

    def backend(self, name: str) -> Availability | None:
        """The probe result of backend ``name``, or None when it was not probed."""
        return next((b for b in self.backends if b.name == name), None)


_T = TypeVar("_T")


def _build(cls: type[_T], data: Any) -> _T:
    if not isinstance(data, Mapping):
        return cls()
    kwargs = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def detect(
    root: str | os.PathLike[str] | None = None, *, probe_backends: bool = True
) -> DeviceInfo:
    """Detect this machine (or, with ``root``, the machine whose files lie under that folder).

    Never raises: every field that cannot be read is None with its reason in ``notes``.
    ``probe_backends=False`` skips asking the backends what they can do (it imports their
    runtimes, the slowest part of detection).
    """
    live = root is None
    files = SystemFiles(Path("/") if root is None else Path(root))
    notes: dict[str, str] = {}

    def soft(name: str, reader: Callable[[], _T], default: _T) -> _T:
        # A reader bug must never break `edgert device`: keep what the others found.
        try:
            return reader()
        except Exception as exc:  # noqa: BLE001 - failing soft is the contract
            notes[name] = f"reading failed: {type(exc).__name__}: {exc}"
            return default

    cpu_fields = soft("cpu", lambda: read_cpu(files, live, notes), {})
    memory_fields = soft("memory", lambda: read_memory(files, live, notes), {})
    board_fields = soft("board", lambda: read_board(files, live, notes), {})
    thermal_fields = soft("thermal", lambda: read_thermal(files, live, notes), {})
    os_fields = soft("os", lambda: read_os(files, live, notes), {})
    cpu = CpuInfo(**cpu_fields)
    memory = MemoryInfo(**memory_fields)
    board = BoardInfo(**board_fields)
    gpus = soft("gpus", lambda: _detect_gpus(files, live, cpu, memory, board, notes), ())
    backends: tuple[Availability, ...] = ()
    if probe_backends and live:
        backends = soft("backends", lambda: _probe_backends(notes), ())
    else:
        notes["backends"] = "not probed" if live else "not probed (detection from a root folder)"
    _note_missing(notes, "cpu", cpu)
    _note_missing(notes, "memory", memory)
    return DeviceInfo(
        cpu=cpu,
        memory=memory,
        gpus=gpus,
        board=board,
        thermal=ThermalInfo(**thermal_fields),
        os=OsInfo(**os_fields),
        backends=backends,
        notes=notes,
    )


def _note_missing(notes: dict[str, str], prefix: str, obj: object) -> None:
    # A field left None without a specific reason still gets one, so `notes` is complete.
    for f in fields(obj):  # type: ignore[arg-type]
        key = f"{prefix}.{f.name}"
        if getattr(obj, f.name) is None and key not in notes and prefix not in notes:
            notes[key] = "not reported by this system"


def _detect_gpus(
    files: SystemFiles,
    live: bool,
    cpu: CpuInfo,
    memory: MemoryInfo,
    board: BoardInfo,
    notes: dict[str, str],
) -> tuple[GpuInfo, ...]:
    if board.family == "jetson":
        # Jetson's GPU is integrated and shares RAM; NVML does not exist there.
        gpu = read_jetson_gpu(board.model, memory.total_bytes, memory.available_bytes)
        return (GpuInfo(**gpu),)
    if cpu.model and cpu.model.startswith("Apple M"):
        # Apple silicon: Metal on the unified memory. macOS caps what the GPU may wire
        # (recommendedMaxWorkingSetSize, about 2/3 to 3/4 of RAM); profiles keep headroom for it.
        return (
            GpuInfo(
                vendor="apple",
                name=f"{cpu.model} GPU",
                api="metal",
                memory_total_bytes=memory.total_bytes,
                memory_free_bytes=memory.available_bytes,
                unified_memory=True,
            ),
        )
    return tuple(GpuInfo(**g) for g in read_nvidia_gpus(files, live, notes))


def _probe_backends(notes: dict[str, str]) -> tuple[Availability, ...]:
    from .backends import BACKENDS, probe

    found = []
    for spec in BACKENDS:
        # One broken probe (not only a missing import) must not hide the others.
        try:
            found.append(probe(spec.name))
        except Exception as exc:  # noqa: BLE001
            reason = f"probe failed: {type(exc).__name__}: {exc}"
            notes[f"backends.{spec.name}"] = reason
            found.append(Availability(name=spec.name, available=False, reason=reason))
    return tuple(found)


# --- the human table -------------------------------------------------------------------------


def format_device(info: DeviceInfo, profile_id: str | None = None) -> str:
    """The ``edgert device`` table: one labelled line per part of the machine."""
    rows = [
        ("Board", _board_line(info)),
        ("OS", _os_line(info)),
        ("CPU", _cpu_line(info)),
        ("Memory", _memory_line(info)),
        ("GPU", _gpu_line(info)),
        ("Thermal", _thermal_line(info)),
        ("Backends", _backends_line(info)),
    ]
    if profile_id is not None:
        rows.append(("Profile", profile_id))
    return "\n".join(f"{label:<9} {value}" for label, value in rows)


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _unknown(info: DeviceInfo, *keys: str) -> str:
    reason = next((info.notes[k] for k in keys if k in info.notes), None)
    return f"unknown ({reason})" if reason else "unknown"


def _board_line(info: DeviceInfo) -> str:
    b = info.board
    if not b.model:
        return _unknown(info, "board.model", "board")
    extras = [x for x in (b.release and f"L4T {b.release}", b.chassis) if x]
    return " · ".join([b.model, *extras])


def _os_line(info: DeviceInfo) -> str:
    o = info.os
    parts = [x for x in (o.distro, o.system and o.release and f"{o.system} {o.release}") if x]
    parts += [f"Python {o.python}"] if o.python else []
    return " · ".join(parts) or _unknown(info, "os.system", "os")


def _cpu_line(info: DeviceInfo) -> str:
    c = info.cpu
    name = c.model or "unknown CPU"
    heterogeneous = bool(c.efficiency_cores)
    # "Cortex-A76 ×4" reads well for a board's identical cores; a PC CPU gets a core count.
    same_cores = c.physical_cores == c.logical_cores and not heterogeneous
    if c.physical_cores and same_cores and not (c.arch or "").startswith("x86"):
        head = f"{name} ×{c.physical_cores}"
    else:
        counts = f"{c.physical_cores or '?'} cores"
        if heterogeneous:
            counts += f" ({c.performance_cores}P + {c.efficiency_cores}E)"
        if c.logical_cores and c.logical_cores != c.physical_cores:
            counts += f" / {c.logical_cores} threads"
        head = f"{name} · {counts}"
    head += f" ({c.arch})" if c.arch else ""
    shown = [label for flag, label in _FLAG_LABELS.items() if flag in c.flags]
    parts = [head, " ".join(shown) if shown else "no SIMD features known"]
    if c.max_freq_mhz:
        parts.append(f"{c.max_freq_mhz / 1000:.1f} GHz")
    return " · ".join(parts)


def _memory_line(info: DeviceInfo) -> str:
    m = info.memory
    if m.total_bytes is None:
        return _unknown(info, "memory.total_bytes", "memory")
    swap = "no swap" if not m.swap_total_bytes else f"swap {_gib(m.swap_total_bytes)}"
    return f"{_gib(m.total_bytes)} total · {_gib(m.available_bytes)} available · {swap}"


def _gpu_line(info: DeviceInfo) -> str:
    if not info.gpus:
        reason = info.notes.get("gpus")
        return "none usable for LLM inference" + (f" ({reason})" if reason else "")
    lines = []
    for g in info.gpus:
        parts = [g.name, (g.api or "").upper().replace("METAL", "Metal")]
        if g.unified_memory:
            parts.append(f"unified memory {_gib(g.memory_total_bytes)}")
        elif g.memory_total_bytes is not None:
            parts.append(f"{_gib(g.memory_total_bytes)} VRAM ({_gib(g.memory_free_bytes)} free)")
        else:
            parts.append("VRAM unknown")
        if g.compute_capability:
            parts.append(f"compute {g.compute_capability}")
        lines.append(" · ".join(p for p in parts if p))
    return "\n          ".join(lines)


def _thermal_line(info: DeviceInfo) -> str:
    t = info.thermal
    parts = [
        f"{t.temperature_c:.1f} °C" if t.temperature_c is not None else "temperature unknown"
    ]
    if t.throttled is not None:
        state = "throttled" if t.throttled else "not throttled"
        past = [f.removesuffix("-occurred") for f in t.throttle_flags if f.endswith("-occurred")]
        now = [f for f in t.throttle_flags if not f.endswith("-occurred")]
        if now:
            state += f" ({', '.join(now)})"
        if past:
            state += f" · since boot: {', '.join(past)}"
        parts.append(state)
    return " · ".join(parts)


def _backends_line(info: DeviceInfo) -> str:
    if not info.backends:
        return info.notes.get("backends", "none probed")
    parts = []
    for b in info.backends:
        if b.available:
            devices = f" ({', '.join(b.devices)})" if b.devices else ""
            parts.append(f"{b.name} {b.version or ''}".rstrip() + devices)
        else:
            parts.append(f"{b.name} missing")
    return " · ".join(parts)
