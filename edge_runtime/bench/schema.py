"""The bench result's JSON Schema, checking documents against it, and loading result files safely.

The schema is a JSON-Schema (2020-12) dict; ``jsonschema`` checks documents against it, with one
addition: numbers must be finite (``NaN`` and ``Infinity`` are not JSON, even though Python's
``json`` reads them). Each problem becomes one line naming its JSON path.

A file ``edgert report`` reads holds one bench result, or several under ``runs`` (a fleet file,
or a ``report.json`` written earlier). Anything else, an older or newer schema, or a truncated
file, is one ``InvalidConfigError`` naming the file and the problem.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidConfigError
from edge_runtime.files import parse_json, read_regular_file

SCHEMA_VERSION = 1
RESULT_MAX_BYTES = 64 << 20  # a result of many artifacts is a few MB; a file far larger is not one
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

_PER_THREADS = {"type": "object", "propertyNames": {"pattern": "^[1-9][0-9]*$"}, "additionalProperties": _NUMBER,
                "minProperties": 1}


def _numbers(required: list[str], nullable: tuple[str, ...] = (), **more: Any) -> dict[str, Any]:
    """An object whose ``required`` keys are numbers (``nullable`` ones may be null)."""
    props = {key: _OPT_NUMBER if key in nullable else _NUMBER for key in required}
    return {"type": "object", "required": required, "properties": {**props, **more}}


# edgert bench --anatomy: where one reply's time goes (bench/anatomy.py).
ANATOMY_SCHEMA: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["storage", "compute", "transfer", "cache"],
    "properties": {
        "storage": _numbers(["cold_load_s", "warm_load_s", "first_prefill_pagein_s"],
                            cold_load_no_mmap_s=_NUMBER, warm_load_no_mmap_s=_NUMBER,
                            first_prefill_pagein_no_mmap_s=_NUMBER, note={"type": "string"}),
        "compute": {"type": "object", "required": ["prefill_tok_s", "decode_tok_s"],
                    "properties": {"prefill_tok_s": _PER_THREADS, "decode_tok_s": _PER_THREADS,
                                   "roofline_ceiling_tok_s": _OPT_NUMBER}},
        # rpc_ttft_ms: what the RPC hop adds (may be negative within noise); null without workers
        "transfer": _numbers(["in_process_ttft_ms", "http_ttft_ms", "rpc_ttft_ms"], ("rpc_ttft_ms",),
                             rpc_ttft_ms={"type": ["number", "null"]}, prompt_tokens=_COUNT),
        "cache": _numbers(["cold_ttft_ms", "restored_ttft_ms", "hot_ttft_ms"], ("restored_ttft_ms",),
                          restored_note={"type": ["string", "null"]}, turn=_COUNT, prompt_tokens=_COUNT),
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
        "load_average": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
        "energy": {"type": "object", "properties": {"available": {"type": "boolean"},
                                                    "decode_j_per_token": _OPT_NUMBER,
                                                    "prefill_j_per_token": _OPT_NUMBER}},
        "plan": {"type": ["object", "null"]}, "model": {"type": ["object", "null"]},
        "notes": {"type": "array", "items": {"type": "string"}},
        "samples": {"type": "array", "items": SAMPLE_SCHEMA},
        "anatomy": ANATOMY_SCHEMA,
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


def _finite_number(checker: Any, value: Any) -> bool:
    """JSON has no NaN or Infinity, though Python's ``json`` reads them: a number must be finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@functools.cache
def _validator() -> Any:
    """A draft 2020-12 validator for ``BENCH_SCHEMA`` whose numbers are finite (built on first use)."""
    from jsonschema import validators

    base = validators.validator_for(BENCH_SCHEMA)
    base.check_schema(BENCH_SCHEMA)
    finite = validators.extend(base, type_checker=base.TYPE_CHECKER.redefine("number", _finite_number))
    return finite(BENCH_SCHEMA)


def _shown_type(value: Any) -> str:
    return "NaN/Infinity" if isinstance(value, float) and not math.isfinite(value) else type(value).__name__


def _describe(error: Any) -> str:
    """One jsonschema error as ``<JSON path>: <what is wrong>``, in words a person reading the file can act on."""
    where, value, rule, limit = error.json_path, error.instance, error.validator, error.validator_value
    if "propertyNames" in error.schema_path:  # the instance is a key of the object at ``where``
        return f"{where}: key {value!r} does not match {limit}"
    if rule == "type":
        names = limit if isinstance(limit, list) else [limit]
        return f"{where}: expected {' or '.join(names)}, found {_shown_type(value)}"
    if rule == "const":
        return f"{where}: expected {limit!r}, found {value!r}"
    if rule == "enum":
        return f"{where}: {value!r} is not one of {limit}"
    if rule == "minimum":
        return f"{where}: {value} is below {limit}"
    if rule == "exclusiveMinimum":
        return f"{where}: {value} must be above {limit}"
    if rule == "minItems":
        return f"{where}: needs at least {limit} item{'s' if limit != 1 else ''}"
    return f"{where}: {error.message}"


def schema_errors(value: Any) -> list[str]:
    """Every way ``value`` breaks ``BENCH_SCHEMA``, one ``<JSON path>: <problem>`` line each, in the schema's order."""
    problems: list[str] = []
    for error in _validator().iter_errors(value):
        if error.validator == "required":
            # One error per missing key, and only its message names the key: list them from the rule instead.
            missing = [key for key in error.validator_value if key not in error.instance]
            problems += [line for key in missing if (line := f"{error.json_path}: missing {key!r}") not in problems]
        else:
            problems.append(_describe(error))
    return problems


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
    problems = schema_errors(doc)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InvalidConfigError(f"{source}: not a valid bench result: {problems[0]}{more}",
                                 "re-run `edgert bench --json FILE`; a hand-made file must follow "
                                 "BENCH_SCHEMA in edge_runtime/bench/schema.py")


def load_runs(path: str | Path) -> list[dict[str, Any]]:
    """The bench results in one file: a bench result, or a fleet/report file holding ``runs``."""
    shown = str(path)
    raw = read_regular_file(path, RESULT_MAX_BYTES, "bench result")
    if not raw.strip():
        raise InvalidConfigError(f"{shown}: the file is empty", "re-run `edgert bench --json FILE`")
    doc = parse_json(raw, shown, "re-run `edgert bench --json FILE` and keep the whole file")
    if isinstance(doc, dict) and doc.get("kind") in COLLECTION_KINDS:
        runs = doc.get("runs")
        if not isinstance(runs, list) or not runs:
            raise InvalidConfigError(f"{shown}: a {doc['kind']} file without runs", "list bench results under \"runs\"")
        for i, run in enumerate(runs):
            check_bench_document(run, f"{shown} runs[{i}]")
        return runs
    check_bench_document(doc, shown)
    return [doc]
