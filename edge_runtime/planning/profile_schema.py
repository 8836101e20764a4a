"""The profile file format: parse one TOML profile and check every key, naming what was expected.

``parse_profile`` turns a file into the keyword arguments of ``profiles.DeviceProfile`` (with
``match`` and ``floor`` as plain dicts). Any problem is an ``InvalidConfigError`` whose message
names the file, the key and what the key should hold, so a user editing a profile can fix it
without reading this code.
"""

from __future__ import annotations

import re
import sys
from pathlib import PurePath
from typing import Any

from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError
from edge_runtime.planning.floor import PROCESSORS

# Names a profile may use. Backends are matched by the planner against the registry in
# backends/__init__.py; these are the built-in ones, listed here so a typo is an error at load
# time instead of a backend silently never chosen.
KNOWN_BACKENDS = ("llama.cpp", "onnx", "tflite")
KNOWN_FORMATS = ("gguf", "onnx", "tflite")
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl")
GPU_VENDORS = ("nvidia", "apple", "amd", "intel", "none")
_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_HINT = "see the shipped profiles/generic.toml for the format of every key"


def _load_toml(path: str, raw: bytes) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 only
        try:
            import tomli as tomllib
        except ImportError as exc:
            raise EdgeRuntimeError(
                "reading profiles on Python 3.10 needs the tomli package", "pip install tomli"
            ) from exc
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidConfigError(f"{path}: not UTF-8 text ({exc})", _HINT) from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfigError(f"{path}: not valid TOML: {exc}", _HINT) from exc


def _describe(value: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list",
            dict: "table"}.get(type(value), type(value).__name__)  # fmt: skip
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    return f"{kind} {shown}"


class _Table:
    """One TOML table being read; remembers which keys were used to reject unknown ones."""

    def __init__(self, path: str, prefix: str, data: Any) -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            self.fail("", "a table", data)
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def fail(self, key: str, expected: str, value: Any = ...) -> None:
        where = f"{self.prefix}.{key}" if self.prefix and key else (self.prefix or key)
        got = "it is missing" if value is ... else f"got {_describe(value)}"
        raise InvalidConfigError(f"{self.path}: key '{where}': expected {expected}, {got}", _HINT)

    def get(self, key: str, expected: str, check: Any, *, required: bool = True) -> Any:
        """The value under ``key`` if ``check(value)`` holds; None when optional and absent."""
        self.used.add(key)
        if key not in self.data:
            if required:
                self.fail(key, expected)
            return None
        value = self.data[key]
        if not check(value):
            self.fail(key, expected, value)
        return value

    def table(self, key: str, *, required: bool = True) -> _Table:
        """The sub-table under ``key`` (an empty one when optional and absent)."""
        self.used.add(key)
        if key not in self.data and not required:
            return _Table(self.path, f"{self.prefix}.{key}".lstrip("."), {})
        if key not in self.data:
            self.fail(key, "a table")
        return _Table(self.path, f"{self.prefix}.{key}".lstrip("."), self.data[key])

    def finish(self) -> None:
        """Reject keys nobody asked for: usually a typo of a real key."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            where = f"{self.prefix}.{unknown[0]}" if self.prefix else unknown[0]
            known = ", ".join(sorted(self.used))
            raise InvalidConfigError(
                f"{self.path}: unknown key '{where}' (expected one of: {known})", _HINT
            )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def _is_str_list(v: Any, allowed: tuple[str, ...] | None = None) -> bool:
    return (
        isinstance(v, list)
        and len(v) > 0
        and all(isinstance(x, str) and x and (allowed is None or x in allowed) for x in v)
    )


def _is_regex(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        re.compile(v)
    except re.error:
        return False
    return True


def _parse_match(t: _Table) -> dict[str, Any]:
    gib = "a number of GiB >= 0"
    out: dict[str, Any] = {
        "board": t.get("board", "a regular expression", _is_regex, required=False),
        "cpu_model": t.get("cpu_model", "a regular expression", _is_regex, required=False),
        "arch": tuple(t.get("arch", "a list of architectures such as [\"aarch64\"]",
                            _is_str_list, required=False) or ()),  # fmt: skip
        "os": tuple(t.get("os", "a list of OS names such as [\"Linux\", \"Darwin\"]",
                          _is_str_list, required=False) or ()),  # fmt: skip
        "cpu_flags": tuple(t.get("cpu_flags", "a list of CPU features such as [\"avx2\"]",
                                 _is_str_list, required=False) or ()),  # fmt: skip
        "gpu_vendor": t.get("gpu_vendor", f"one of {', '.join(GPU_VENDORS)}",
                            lambda v: v in GPU_VENDORS, required=False),  # fmt: skip
    }
    for key in ("ram_min_gib", "ram_max_gib", "vram_min_gib", "vram_max_gib"):
        value = t.get(key, gib, lambda v: _is_number(v) and v >= 0, required=False)
        out[key] = None if value is None else float(value)
    for lo, hi in (("ram_min_gib", "ram_max_gib"), ("vram_min_gib", "vram_max_gib")):
        if out[lo] is not None and out[hi] is not None and out[lo] >= out[hi]:
            t.fail(hi, f"a number above {lo} ({out[lo]:g})", out[hi])
    t.finish()
    return out


def _parse_quants(t: _Table) -> dict[str, tuple[str, ...]]:
    t.used.update(KNOWN_FORMATS)
    t.finish()  # an unknown format is reported with the known ones
    quants = {}
    for fmt in KNOWN_FORMATS:
        if fmt in t.data:
            expected = f"a non-empty list of {fmt} quant types, preferred first"
            quants[fmt] = tuple(t.get(fmt, expected, _is_str_list))
    if not quants:
        t.fail("gguf", f"at least one ladder ({', '.join(KNOWN_FORMATS)})")
    return quants


def _parse_floor(t: _Table) -> dict[str, Any]:
    """The class figures the decode floor is computed from (``planning/floor.py``), and overrides."""
    positive = "a positive number"
    floor = {
        "bandwidth_gbs": float(t.get("bandwidth_gbs", f"{positive} of GB/s (sustained read bandwidth)",
                                     lambda v: _is_number(v) and v > 0)),  # fmt: skip
        "compute_gflops": float(t.get("compute_gflops", f"{positive} of GFLOPS (sustained in llama.cpp)",
                                      lambda v: _is_number(v) and v > 0)),  # fmt: skip
        "min_token_ms": float(t.get("min_token_ms", "a number of milliseconds >= 0",
                                    lambda v: _is_number(v) and v >= 0, required=False) or 0),  # fmt: skip
        "efficiency": float(t.get("efficiency", "a fraction of the roofline above 0 and at most 1",
                                  lambda v: _is_number(v) and 0 < v <= 1)),  # fmt: skip
        "cores": t.get("cores", "a positive integer", lambda v: _is_int(v) and v > 0),
        "core_class": t.get("core_class", "a string such as \"Cortex-A76 @ 2.4 GHz\"",
                            lambda v: isinstance(v, str) and v.strip()),  # fmt: skip
        "processor": t.get("processor", f"one of {', '.join(PROCESSORS)}", lambda v: v in PROCESSORS,
                           required=False) or "cpu",  # fmt: skip
        "source": t.get("source", "a string saying where the figures come from",
                        lambda v: isinstance(v, str) and v.strip()),  # fmt: skip
    }
    tables = t.get("override", "a list of [[floor.override]] tables",
                   lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v), required=False)  # fmt: skip
    floor["overrides"] = [_parse_override(_Table(t.path, f"floor.override[{i}]", item))
                          for i, item in enumerate(tables or [])]  # fmt: skip
    t.finish()
    return floor


def _parse_override(o: _Table) -> dict[str, Any]:
    override = {
        "model": o.get("model", "a model name", lambda v: isinstance(v, str) and v),
        "format": o.get("format", f"one of {', '.join(KNOWN_FORMATS)}", lambda v: v in KNOWN_FORMATS),
        "quant": o.get("quant", "a quant type such as \"Q4_0\"", lambda v: isinstance(v, str) and v),
        "decode_tok_s": float(o.get("decode_tok_s", "a positive number of tokens per second",
                                    lambda v: _is_number(v) and v > 0)),  # fmt: skip
        "n_ctx": o.get("n_ctx", "a positive integer", lambda v: _is_int(v) and v > 0),
        "source": o.get("source", "a string saying where the number comes from",
                        lambda v: isinstance(v, str) and v.strip()),  # fmt: skip
    }
    o.finish()
    return override


def parse_profile(path: str, raw: bytes) -> dict[str, Any]:
    """Parse and validate one profile file; the result holds ``DeviceProfile``'s fields."""
    top = _Table(path, "", _load_toml(path, raw))
    stem = PurePath(path).name.removesuffix(".toml")
    profile_id = top.get("id", "a lower-case id such as \"raspberry-pi-5-8gb\"",
                         lambda v: isinstance(v, str) and bool(_ID_PATTERN.match(v)))  # fmt: skip
    if profile_id != stem:
        top.fail("id", f"the file name without .toml ({stem!r})", profile_id)
    description = top.get("description", "a string", lambda v: isinstance(v, str) and v.strip())
    priority = top.get("priority", "an integer (higher wins when several profiles match)", _is_int)
    match = _parse_match(top.table("match", required=False))

    memory = top.table("memory")
    headroom_mib = memory.get("headroom_mib", "a number of MiB >= 0",
                              lambda v: _is_number(v) and v >= 0)  # fmt: skip
    memory.finish()

    backends = top.table("backends")
    order = backends.get("order", f"a non-empty list of backends from {', '.join(KNOWN_BACKENDS)}",
                         lambda v: _is_str_list(v, KNOWN_BACKENDS))  # fmt: skip
    backends.finish()

    quants = _parse_quants(top.table("quant"))

    s = top.table("settings")
    positive = "a positive integer"
    default_ctx = s.get("default_ctx", positive, lambda v: _is_int(v) and v > 0)
    max_ctx = s.get("max_ctx", f"an integer >= default_ctx ({default_ctx})",
                    lambda v: _is_int(v) and v >= default_ctx)  # fmt: skip
    threads = s.get("threads", "\"auto\" or a positive integer",
                    lambda v: v == "auto" or (_is_int(v) and v > 0))  # fmt: skip
    n_batch = s.get("n_batch", positive, lambda v: _is_int(v) and v > 0)
    kv = s.get("kv_cache_type", f"one of {', '.join(KV_CACHE_TYPES)}",
               lambda v: v in KV_CACHE_TYPES)  # fmt: skip
    gpu_offload = s.get("gpu_offload", "true or false", lambda v: isinstance(v, bool),
                        required=False)  # fmt: skip
    s.finish()

    floor = _parse_floor(top.table("floor"))
    top.finish()
    return {
        "id": profile_id,
        "description": description.strip(),
        "priority": priority,
        "match": match,
        "headroom_bytes": int(headroom_mib * 1024 * 1024),
        "backends": tuple(order),
        "quants": quants,
        "default_ctx": default_ctx,
        "max_ctx": max_ctx,
        "threads": None if threads == "auto" else threads,
        "n_batch": n_batch,
        "kv_cache_type": kv,
        "gpu_offload": bool(gpu_offload),
        "floor": floor,
    }
