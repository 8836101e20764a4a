"""``edgert device``'s text: one line per part of a ``DeviceInfo``."""

from __future__ import annotations

from edge_runtime.device.info import GIB, DeviceInfo

# Flags as format_device shows them; the order is roughly "how much it matters to llama.cpp".
_FLAG_LABELS = {
    "avx": "AVX", "avx2": "AVX2", "avx512f": "AVX-512", "f16c": "F16C", "fma": "FMA",
    "avx_vnni": "AVX-VNNI", "avx512_vnni": "AVX512-VNNI", "avx512_bf16": "AVX512-BF16",
    "amx_int8": "AMX", "neon": "NEON", "dotprod": "dotprod", "i8mm": "i8mm", "sve": "SVE",
    "sve2": "SVE2",
}  # fmt: skip


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
