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
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from edge_runtime.backends.base import Availability
from edge_runtime.device.cpu import read_cpu
from edge_runtime.device.readers import (
    SystemFiles,
    read_board,
    read_jetson_gpu,
    read_memory,
    read_nvidia_gpus,
    read_os,
    read_thermal,
)

GIB = 1024**3

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
        except Exception as exc:
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
    from edge_runtime.backends import BACKENDS, probe

    found = []
    for spec in BACKENDS:
        # One broken probe (not only a missing import) must not hide the others.
        try:
            found.append(probe(spec.name))
        except Exception as exc:
            reason = f"probe failed: {type(exc).__name__}: {exc}"
            notes[f"backends.{spec.name}"] = reason
            found.append(Availability(name=spec.name, available=False, reason=reason))
    return tuple(found)


# --- the human table -------------------------------------------------------------------------
