"""The bench result's JSON Schema, a small validator for it, and loading result files safely.

The schema is a JSON-Schema (2020-12) dict so other tools can validate with ``jsonschema``; the
validator here implements only the keywords the schema uses (type, const, enum, minimum,
exclusiveMinimum, required, properties, additionalProperties, propertyNames.pattern, items,
minItems), so the base install needs no extra dependency. Numbers must be finite: ``NaN`` and
``Infinity`` are not JSON, even though Python's ``json`` reads them.

A file ``edgert report`` reads holds one bench result, or several under ``runs`` (a fleet file,
or a ``report.json`` written earlier). Anything else, an older or newer schema, or a truncated
file, is one ``InvalidConfigError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidConfigError

SCHEMA_VERSION = 1
RUN_KINDS = ("edgert-bench",)
COLLECTION_KINDS = ("edgert-fleet", "edgert-report")

_NUMBER = {"type": "number", "minimum": 0}
_OPT_NUMBER = {"type": ["number", "null"], "minimum": 0}
_COUNT = {"type": "integer", "minimum": 0}
_OPT_COUNT = {"type": ["integer", "null"], "minimum": 0}
_PER_PROMPT = {"type": "object", "propertyNames": {"pattern": "^[0-9]+$"}, "additionalProperties": _NUMBER}
_INT_LIST = {"type": "array", "items": {"type": "integer", "minimum": 1}}

SAMPLE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["rep", "warmup", "kind", "prompt_tokens", "gen_tokens", "ttft_ms", "prefill_tok_s", "decode_tok_s"],
    "properties": {
        "rep": _COUNT, "warmup": {"type": "boolean"}, "kind": {"enum": ["prefill", "decode"]},
        "prompt_tokens": _COUNT, "evaluated_tokens": _COUNT, "cached_tokens": _COUNT, "gen_tokens": _COUNT,
        "ttft_ms": _NUMBER, "prefill_s": _NUMBER, "decode_s": _NUMBER, "prefill_tok_s": _NUMBER,
        "decode_tok_s": _NUMBER, "prefill_j": _OPT_NUMBER, "decode_j": _OPT_NUMBER,
        "finish_reason": {"type": ["string", "null"]},
    },
}

ROOFLINE_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],  # null where the artifact's bytes per token are unknown
    "required": ["bandwidth_bytes_s", "bytes_per_token", "ceiling_tok_s", "efficiency"],
    "properties": {
        "bandwidth_bytes_s": {"type": "number", "exclusiveMinimum": 0},
        "bytes_per_token": {"type": "integer", "exclusiveMinimum": 0},
        "weights_bytes_per_token": _COUNT, "kv_bytes_per_token": _COUNT, "context_position": _NUMBER,
        "ceiling_tok_s": {"type": "number", "exclusiveMinimum": 0},
        "efficiency": _OPT_NUMBER,
    },
}

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["artifact", "backend", "threads", "settings", "decode_tok_s", "decode_tok_s_sd", "prefill_tok_s",
                 "prefill_tok_s_sd", "ttft_ms", "load_s", "peak_rss_bytes", "memory_bandwidth_gbs",
                 "decode_ceiling_tok_s", "roofline", "samples"],
    "properties": {
        "artifact": {"type": "object", "required": ["path", "format", "name"],
                     "properties": {"path": {"type": "string"}, "format": {"type": "string"},
                                    "name": {"type": "string"}, "quant": {"type": ["string", "null"]},
                                    "size_bytes": _OPT_COUNT, "quality": {"type": ["object", "null"]}}},
        "backend": {"type": "string"}, "threads": {"type": "integer", "minimum": 1},
        "settings": {"type": "object"},
        "decode_tok_s": _NUMBER, "decode_tok_s_sd": _NUMBER, "prefill_tok_s": _NUMBER, "prefill_tok_s_sd": _NUMBER,
        "prefill_prompt_tokens": _COUNT, "ttft_ms": _PER_PROMPT, "ttft_ms_sd": _PER_PROMPT,
        "prefill_tok_s_by_prompt": _PER_PROMPT, "gen_tokens_mean": _OPT_NUMBER,
        "load_s": _NUMBER, "peak_rss_bytes": _OPT_COUNT, "rss_baseline_bytes": _OPT_COUNT,
        "peak_rss_increase_bytes": {"type": ["integer", "null"]}, "estimated_memory_bytes": _OPT_COUNT,
        "vram_peak_bytes": _OPT_COUNT,
        "memory_bandwidth_gbs": {"type": "number", "exclusiveMinimum": 0},
        "decode_ceiling_tok_s": {"type": ["number", "null"], "exclusiveMinimum": 0},
        "roofline": ROOFLINE_SCHEMA,
        "temperature_c": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
        "energy": {"type": "object", "properties": {"available": {"type": "boolean"},
                                                    "decode_j_per_token": _OPT_NUMBER,
                                                    "prefill_j_per_token": _OPT_NUMBER}},
        "plan": {"type": ["object", "null"]}, "model": {"type": ["object", "null"]},
        "notes": {"type": "array", "items": {"type": "string"}},
        "samples": {"type": "array", "items": SAMPLE_SCHEMA},
    },
}

BENCH_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgert bench result",
    "type": "object",
    "required": ["schema_version", "kind", "created", "device", "method", "memory_bandwidth", "results"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"const": "edgert-bench"},
        "created": {"type": "string"},
        "edgert_version": {"type": "string"},
        "device": {"type": "object", "required": ["cpu", "memory"],
                   "properties": {"cpu": {"type": "object"}, "memory": {"type": "object"},
                                  "gpus": {"type": "array"}}},
        "profile": {"type": ["object", "null"],
                    "properties": {"id": {"type": "string"}, "floor": {"type": "object"}}},
        "method": {"type": "object",
                   "required": ["reps", "warmup", "threads", "prompt_tokens", "gen_tokens"],
                   "properties": {"reps": {"type": "integer", "minimum": 1}, "warmup": _COUNT,
                                  "threads": _INT_LIST, "prompt_tokens": {**_INT_LIST, "minItems": 1},
                                  "gen_tokens": {"type": "integer", "minimum": 1},
                                  "decode_prompt_tokens": {"type": "integer", "minimum": 1}}},
        "memory_bandwidth": {"type": "object", "required": ["bytes_s", "gbs"],
                             "properties": {"bytes_s": {"type": "number", "exclusiveMinimum": 0},
                                            "gbs": {"type": "number", "exclusiveMinimum": 0}}},
        "recommendation": {"type": ["object", "null"]},
        "results": {"type": "array", "items": RESULT_SCHEMA},
        "skipped": {"type": "array", "items": {"type": "object"}},
    },
}

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool}


def _is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, _TYPES[name])


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema`` (the subset described in the module docstring)."""
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, n) for n in names):
            shown = "NaN/Infinity" if isinstance(value, float) and not math.isfinite(value) else type(value).__name__
            return [f"{where}: expected {' or '.join(names)}, found {shown}"]
    if "const" in schema and value != schema["const"]:
        return [f"{where}: expected {schema['const']!r}, found {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where}: {value!r} is not one of {schema['enum']}"]
    errors: list[str] = []
    if _is_type(value, "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} is below {schema['minimum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{where}: {value} must be above {schema['exclusiveMinimum']}")
    if isinstance(value, dict):
        errors += [f"{where}: missing {key!r}" for key in schema.get("required", ()) if key not in value]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        pattern = schema.get("propertyNames", {}).get("pattern")
        for key, item in value.items():
            if pattern is not None and not re.search(pattern, key):
                errors.append(f"{where}: key {key!r} does not match {pattern}")
            if key in properties:
                errors += schema_errors(item, properties[key], f"{where}.{key}")
            elif extra is False:
                errors.append(f"{where}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{where}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: needs at least {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def check_bench_document(doc: Any, source: str = "the bench result") -> None:
    """Raise ``InvalidConfigError`` (one line) unless ``doc`` is a current bench result."""
    if not isinstance(doc, dict):
        raise InvalidConfigError(f"{source}: not an edgert bench result (a JSON {type(doc).__name__})",
                                 "give a file written by `edgert bench --json FILE`")
    version = doc.get("schema_version")
    if version is None:
        raise InvalidConfigError(f"{source}: has no schema_version: written by an older edgert or not a bench result",
                                 "re-run `edgert bench --json FILE` with this version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidConfigError(f"{source}: schema_version {version!r} is not a number")
    if version < SCHEMA_VERSION:
        raise InvalidConfigError(f"{source}: written by an older edgert (schema version {version}; "
                                 f"this edgert reads {SCHEMA_VERSION})",
                                 "re-run `edgert bench --json FILE` with this version")
    if version > SCHEMA_VERSION:
        raise InvalidConfigError(f"{source}: written by a newer edgert (schema version {version}; "
                                 f"this edgert reads {SCHEMA_VERSION})", "upgrade edge-runtime to read it")
    problems = schema_errors(doc, BENCH_SCHEMA)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidConfigError(f"{source}: not a valid bench result: {problems[0]}{more}",
                                 "re-run `edgert bench --json FILE`; hand-made files must follow bench_schema.py")


def load_runs(path: str | Path) -> list[dict[str, Any]]:
    """The bench results in one file: a bench result, or a fleet/report file holding ``runs``."""
    shown = str(path)
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidConfigError(f"{shown}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"{shown}: cannot read it ({exc})") from None
    if not raw.strip():
        raise InvalidConfigError(f"{shown}: the file is empty", "re-run `edgert bench --json FILE`")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        cut = " (the file looks truncated)" if exc.pos >= len(raw.rstrip()) - 1 else ""
        raise InvalidConfigError(f"{shown}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}{cut}",
                                 "re-run `edgert bench --json FILE` and keep the whole file") from None
    if isinstance(doc, dict) and doc.get("kind") in COLLECTION_KINDS:
        runs = doc.get("runs")
        if not isinstance(runs, list) or not runs:
            raise InvalidConfigError(f"{shown}: a {doc['kind']} file without runs", "list bench results under \"runs\"")
        for i, run in enumerate(runs):
            check_bench_document(run, f"{shown} runs[{i}]")
        return runs
    check_bench_document(doc, shown)
    return [doc]
