"""Device profiles: one TOML file per device class, loaded, validated and matched to a DeviceInfo.

Shipped profiles live in ``profiles/`` (installed as ``edge_runtime.profiles_data``). Users add or
override profiles in ``<config dir>/profiles/*.toml``: the platform's user config folder for
``edge-runtime``, or ``$EDGERT_HOME/profiles`` when ``EDGERT_HOME`` is set. A user profile whose id
equals a shipped one replaces it. The file format is documented in ``profiles/generic.toml``.

Matching: every profile whose ``[match]`` rules all hold is a candidate; the highest
``priority`` wins, then the one with more rules (more specific), then the id. The ``generic``
profile has no rules, so something always matches.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.device.info import DeviceInfo
from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError
from edge_runtime.planning.floor import DecodeFloor, ModelFloor
from edge_runtime.planning.profile_schema import parse_profile

GIB = 1024**3
FALLBACK_ID = "generic"


@dataclass(frozen=True)
class MatchRules:
    """How to recognise a device; every rule that is set must hold (an empty set matches all)."""

    board: str | None = None  # regex searched in DeviceInfo.board.model
    cpu_model: str | None = None  # regex searched in DeviceInfo.cpu.model
    arch: tuple[str, ...] = ()  # any of these (normalized: x86_64, aarch64, armv7l)
    os: tuple[str, ...] = ()  # any of these DeviceInfo.os.system values
    cpu_flags: tuple[str, ...] = ()  # all of these canonical SIMD features
    ram_min_gib: float | None = None  # total RAM >= this
    ram_max_gib: float | None = None  # total RAM < this
    gpu_vendor: str | None = None  # "nvidia", "apple", ... or "none": no usable GPU
    vram_min_gib: float | None = None  # some dedicated GPU of gpu_vendor has >= this VRAM
    vram_max_gib: float | None = None  # ... and < this

    @property
    def specificity(self) -> int:
        """How many rules are set; breaks ties between equal priorities."""
        return sum(1 for v in asdict(self).values() if v not in (None, ()))


@dataclass(frozen=True)
class DeviceProfile:
    """Preferences and limits for one device class; the planner reads these."""

    id: str
    description: str
    priority: int
    match: MatchRules
    headroom_bytes: int  # memory to leave free for the OS and other programs
    backends: tuple[str, ...]  # preference order
    # format → quant ladder, preferred first (a dict, so left out of the hash)
    quants: dict[str, tuple[str, ...]] = field(hash=False)
    default_ctx: int
    max_ctx: int
    threads: int | None  # None: auto (physical performance cores)
    n_batch: int
    kv_cache_type: str  # llama.cpp type_k/type_v: "f16", "q8_0", ...
    gpu_offload: bool  # offload layers to the GPU when the backend can
    floor: DecodeFloor  # what a healthy device of the class has: the decode floor of any model
    path: str | None = field(default=None, compare=False)  # file it was loaded from

    def quant_ladder(self, fmt: str) -> tuple[str, ...]:
        """The quant ladder for artifact format ``fmt`` (empty when the profile has none)."""
        return self.quants.get(fmt, ())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; ``threads`` is ``"auto"`` when unset."""
        data = asdict(self)
        data["threads"] = "auto" if self.threads is None else self.threads
        return _lists(data)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeviceProfile:
        """Rebuild from ``to_dict()`` output."""
        threads = data.get("threads")
        return cls(
            id=data["id"],
            description=data["description"],
            priority=int(data["priority"]),
            match=MatchRules(**{k: tuple(v) if isinstance(v, list) else v
                                for k, v in data["match"].items()}),  # fmt: skip
            headroom_bytes=int(data["headroom_bytes"]),
            backends=tuple(data["backends"]),
            quants={k: tuple(v) for k, v in data["quants"].items()},
            default_ctx=int(data["default_ctx"]),
            max_ctx=int(data["max_ctx"]),
            threads=None if threads in (None, "auto") else int(threads),
            n_batch=int(data["n_batch"]),
            kv_cache_type=data["kv_cache_type"],
            gpu_offload=bool(data["gpu_offload"]),
            floor=DecodeFloor.from_dict(data["floor"]),
            path=data.get("path"),
        )


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


@dataclass(frozen=True)
class ProfileMatch:
    """One profile checked against a device: whether every rule held, and what each rule saw."""

    profile: DeviceProfile
    matched: bool
    reasons: tuple[str, ...]  # one line per rule, passed or failed

    @property
    def failed(self) -> tuple[str, ...]:
        """The reasons of the rules that did not hold."""
        return tuple(r for r in self.reasons if r.startswith("✗"))


# --- loading ---------------------------------------------------------------------------------


def user_profiles_dir() -> Path:
    """Where user profiles live: ``$EDGERT_HOME/profiles`` or the user config folder's."""
    home = os.environ.get("EDGERT_HOME")
    if home:
        return Path(home).expanduser() / "profiles"
    import platformdirs

    return Path(platformdirs.user_config_dir("edge-runtime")) / "profiles"


def _shipped_files() -> list[tuple[str, bytes]]:
    try:
        from importlib.resources import files

        folder: Any = files("edge_runtime.profiles_data")
    except ModuleNotFoundError:
        # Running from a checkout that was never installed: read the repository's folder.
        folder = Path(__file__).resolve().parent.parent / "profiles"
    return sorted(
        (str(entry), entry.read_bytes())
        for entry in folder.iterdir()
        if entry.name.endswith(".toml") and entry.is_file()
    )


def _folder_files(folder: Path) -> list[tuple[str, bytes]]:
    if not folder.is_dir():
        return []
    return [(str(p), p.read_bytes()) for p in sorted(folder.glob("*.toml")) if p.is_file()]


def _parse_all(entries: Iterable[tuple[str, bytes]]) -> dict[str, DeviceProfile]:
    found: dict[str, DeviceProfile] = {}
    for path, raw in entries:
        fields = parse_profile(path, raw)
        fields["match"] = MatchRules(**fields["match"])
        floor = dict(fields["floor"])
        overrides = tuple(ModelFloor(**o) for o in floor.pop("overrides"))
        fields["floor"] = DecodeFloor(**floor, overrides=overrides)
        profile = DeviceProfile(**fields, path=path)
        if profile.id in found:
            raise InvalidConfigError(
                f"{path}: profile id {profile.id!r} is also defined in {found[profile.id].path}",
                "give each profile file its own id",
            )
        found[profile.id] = profile
    return found


def load_profiles(
    user_dir: str | os.PathLike[str] | None = None, *, include_user: bool = True
) -> dict[str, DeviceProfile]:
    """All profiles by id: the shipped ones, then user ones (same id replaces a shipped one).

    Raises ``InvalidConfigError`` naming the file, the key and what was expected when a file
    is malformed. ``user_dir`` defaults to ``user_profiles_dir()``.
    """
    profiles = _parse_all(_shipped_files())
    if include_user:
        folder = Path(user_dir) if user_dir is not None else user_profiles_dir()
        profiles.update(_parse_all(_folder_files(folder)))
    if FALLBACK_ID not in profiles:
        raise EdgeRuntimeError(
            f"the fallback profile {FALLBACK_ID!r} is missing", "reinstall edge-runtime"
        )
    return dict(sorted(profiles.items()))


def get_profile(
    profile_id: str, profiles: Mapping[str, DeviceProfile] | None = None
) -> DeviceProfile:
    """The profile called ``profile_id``; an unknown id is an error listing the known ones."""
    profiles = load_profiles() if profiles is None else profiles
    if profile_id in profiles:
        return profiles[profile_id]
    raise InvalidConfigError(
        f"unknown profile {profile_id!r}",
        f"known profiles: {', '.join(profiles)} (see `edgert profiles list`)",
    )


# --- matching --------------------------------------------------------------------------------


def _range_check(label: str, value_gib: float | None, lo: float | None, hi: float | None) -> str:
    if value_gib is None:
        return f"✗ {label} unknown"
    shown = f"{label} {value_gib:.1f} GiB"
    if lo is not None and value_gib < lo:
        return f"✗ {shown} is below {lo:g} GiB"
    if hi is not None and value_gib >= hi:
        return f"✗ {shown} is not below {hi:g} GiB"
    limits = (lo is not None and f"≥ {lo:g}", hi is not None and f"< {hi:g}")
    bounds = " and ".join(x for x in limits if x)
    return f"✓ {shown} {bounds} GiB"


def _check_gpu(rules: MatchRules, info: DeviceInfo) -> list[str]:
    vendor = rules.gpu_vendor
    if vendor == "none":
        names = ", ".join(g.name for g in info.gpus)
        return [f"✗ GPU {names} present, profile wants none" if info.gpus else "✓ no GPU"]
    if vendor is None and rules.vram_min_gib is None and rules.vram_max_gib is None:
        return []
    gpus = [g for g in info.gpus if vendor is None or g.vendor == vendor]
    if not gpus:
        return [f"✗ no {vendor or 'usable'} GPU"]
    out = [f"✓ {vendor} GPU {gpus[0].name}"] if vendor else []
    if rules.vram_min_gib is None and rules.vram_max_gib is None:
        return out
    dedicated = [g for g in gpus if not g.unified_memory]
    sizes = [g.memory_total_bytes / GIB for g in dedicated if g.memory_total_bytes is not None]
    if dedicated and not sizes:
        return [*out, "✗ VRAM unknown (install nvidia-ml-py to read it)"]
    checks = [_range_check("VRAM", s, rules.vram_min_gib, rules.vram_max_gib) for s in sizes]
    best = next((c for c in checks if c.startswith("✓")), None)
    return [*out, best or (checks[0] if checks else "✗ no GPU with dedicated VRAM")]


def check_profile(profile: DeviceProfile, info: DeviceInfo) -> ProfileMatch:
    """Check every match rule of ``profile`` against ``info``."""
    r = profile.match
    reasons: list[str] = []
    for label, pattern, value in (("board", r.board, info.board.model),
                                  ("CPU", r.cpu_model, info.cpu.model)):  # fmt: skip
        if pattern is not None:
            ok = value is not None and re.search(pattern, value) is not None
            reasons.append(f"{'✓' if ok else '✗'} {label} {value or 'unknown'!s} "
                           f"{'matches' if ok else 'does not match'} /{pattern}/")  # fmt: skip
    for label, allowed, value in (("arch", r.arch, info.cpu.arch), ("OS", r.os, info.os.system)):
        if allowed:
            ok = value in allowed
            reasons.append(f"{'✓' if ok else '✗'} {label} {value or 'unknown'} "
                           f"{'is' if ok else 'is not'} one of {', '.join(allowed)}")  # fmt: skip
    if r.cpu_flags:
        missing = [f for f in r.cpu_flags if f not in info.cpu.flags]
        reasons.append(f"✗ CPU lacks {', '.join(missing)}" if missing
                       else f"✓ CPU has {', '.join(r.cpu_flags)}")  # fmt: skip
    if r.ram_min_gib is not None or r.ram_max_gib is not None:
        total = info.memory.total_bytes
        ram = None if total is None else total / GIB
        reasons.append(_range_check("RAM", ram, r.ram_min_gib, r.ram_max_gib))
    reasons += _check_gpu(r, info)
    if not reasons:
        reasons.append("✓ no rules: matches any device")
    matched = all(x.startswith("✓") for x in reasons)
    return ProfileMatch(profile=profile, matched=matched, reasons=tuple(reasons))


def rank_profiles(
    info: DeviceInfo, profiles: Mapping[str, DeviceProfile] | None = None
) -> list[ProfileMatch]:
    """Every profile checked against ``info``: matches first, best first; then the others."""
    profiles = load_profiles() if profiles is None else profiles
    checked = [check_profile(p, info) for p in profiles.values()]
    checked.sort(key=lambda m: (not m.matched, -m.profile.priority,
                                -m.profile.match.specificity, m.profile.id))  # fmt: skip
    return checked


def explain_match(
    info: DeviceInfo, profiles: Mapping[str, DeviceProfile] | None = None
) -> ProfileMatch:
    """The winning profile for ``info`` with the rules that made it match."""
    ranked = rank_profiles(info, profiles)
    if not ranked or not ranked[0].matched:
        # Only possible with a hand-made profile set lacking `generic`.
        raise InvalidConfigError("no profile matches this device", "add a profile without rules")
    return ranked[0]


def match_profile(
    info: DeviceInfo, profiles: Mapping[str, DeviceProfile] | None = None
) -> DeviceProfile:
    """The most specific profile whose rules all hold for ``info`` (``generic`` at worst)."""
    return explain_match(info, profiles).profile


# --- tables for `edgert profiles list|show|match` ---------------------------------------------


def _match_summary(rules: MatchRules) -> str:
    parts = []
    if rules.board:
        parts.append(f"board /{rules.board}/")
    if rules.cpu_model:
        parts.append(f"cpu /{rules.cpu_model}/")
    if rules.arch:
        parts.append("/".join(rules.arch))
    if rules.os:
        parts.append("/".join(rules.os))
    if rules.cpu_flags:
        parts.append("+".join(rules.cpu_flags))
    if rules.ram_min_gib is not None or rules.ram_max_gib is not None:
        lo = f"{rules.ram_min_gib:g}" if rules.ram_min_gib is not None else "0"
        hi = f"{rules.ram_max_gib:g}" if rules.ram_max_gib is not None else "∞"
        parts.append(f"RAM {lo}–{hi} GiB")
    if rules.gpu_vendor:
        parts.append(f"GPU {rules.gpu_vendor}")
    if rules.vram_min_gib is not None or rules.vram_max_gib is not None:
        lo = f"{rules.vram_min_gib:g}" if rules.vram_min_gib is not None else "0"
        hi = f"{rules.vram_max_gib:g}" if rules.vram_max_gib is not None else "∞"
        parts.append(f"VRAM {lo}–{hi} GiB")
    return ", ".join(parts) or "any device"


def format_profile_table(
    profiles: Mapping[str, DeviceProfile], current_id: str | None = None
) -> str:
    """``profiles list``: one row per profile; ``*`` marks ``current_id`` (this device's)."""
    header = ("", "ID", "PRIO", "BACKENDS", "GGUF", "CTX", "FLOOR", "MATCHES")
    rows = [header]
    for p in profiles.values():
        rows.append((
            "*" if p.id == current_id else "",
            p.id,
            str(p.priority),
            ",".join(p.backends),
            p.quant_ladder("gguf")[0] if p.quant_ladder("gguf") else "-",
            f"{p.default_ctx}/{p.max_ctx}",
            f"{p.floor.bandwidth_gbs:g} GB/s × {p.floor.efficiency:.0%}",
            _match_summary(p.match),
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_profile(profile: DeviceProfile) -> str:
    """``profiles show``: every setting of one profile, one per line."""
    p, f = profile, profile.floor
    rows = [
        ("id", p.id),
        ("about", p.description),
        ("file", p.path or "-"),
        ("matches", f"{_match_summary(p.match)} (priority {p.priority})"),
        ("headroom", f"{p.headroom_bytes / 2**20:g} MiB left free"),
        ("backends", " > ".join(p.backends)),
        *((f"quant {fmt}", " > ".join(ladder)) for fmt, ladder in p.quants.items()),
        ("context", f"default {p.default_ctx} · max {p.max_ctx}"),
        ("threads", "auto (physical performance cores)" if p.threads is None else str(p.threads)),
        ("batch", str(p.n_batch)),
        ("kv cache", p.kv_cache_type),
        ("gpu", "offload layers when possible" if p.gpu_offload else "CPU only"),
        ("class", f"{f.cores} × {f.core_class} ({f.processor.upper()} figures)"),
        ("floor", f"{f.summary} (any model's floor: the efficiency × its lowest ceiling)"),
        ("source", f.source),
        *(("override", f"{o.model} {o.quant} ({o.format}) ≥ {o.decode_tok_s:g} tok/s at ctx {o.n_ctx}: {o.source}")
          for o in f.overrides),
    ]
    return "\n".join(f"{label:<12} {value}" for label, value in rows)


def format_match(ranked: list[ProfileMatch], limit: int | None = None) -> str:
    """``profiles match``: the winner with its reasons, then why each other profile lost."""
    if not ranked:
        return "no profiles"
    best, rest = ranked[0], ranked[1:]
    lines = [f"profile   {best.profile.id}" + ("" if best.matched else " (no rule set matched)")]
    lines += [f"  {reason}" for reason in best.reasons]
    for m in rest[:limit] if limit is not None else rest:
        if m.matched:
            lines.append(f"also      {m.profile.id}: matches, lower priority or less specific")
        else:
            lines.append(f"not       {m.profile.id}: {'; '.join(r[2:] for r in m.failed)}")
    return "\n".join(lines)
