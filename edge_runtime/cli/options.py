"""Options shared by the commands, the types that check their values, and what they turn into: a
plan, a loaded model, sampling parameters.

Each kind of value has one click type here, so every command refuses the same bad values with the
same words: ``WholeNumber`` and ``FiniteNumber`` within bounds ("at least 16", "between 0 and 1"),
``THREADS`` (at most this device's logical CPUs), ``SEED``, ``MODEL`` (never empty) and
``CommaList`` (``2,4``). A bad value is a usage error: one ``Error:`` line, exit 2.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import click

from edge_runtime.limits import MAX_C_INT, MAX_REPEAT_PENALTY, MAX_SEED
from edge_runtime.models import MODEL_HELP


def bounds_text(minimum: float | None, maximum: float | None, *, above: bool = False) -> str:
    """'between 0 and 1', 'at least 16', 'greater than 0' or 'at most 4', whichever bounds exist."""
    low = None if minimum is None else f"{'greater than' if above else 'at least'} {_number(minimum)}"
    if maximum is None:
        return low or "any number"
    if low is None:
        return f"at most {_number(maximum)}"
    return f"{low} and at most {_number(maximum)}" if above else f"between {_number(minimum)} and {_number(maximum)}"


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


class WholeNumber(click.ParamType):
    """A whole number within bounds; every integer that reaches a native library fits its C int."""

    name = "integer"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(f"{value!r} is not a whole number", param, ctx)
        maximum = self.upper_bound()
        if (self.minimum is not None and number < self.minimum) or (maximum is not None and number > maximum):
            self.fail(f"must be {self.describe(maximum)} (got {number})", param, ctx)
        if number > MAX_C_INT:
            self.fail(f"must be at most {MAX_C_INT} (got {number})", param, ctx)
        return number

    def upper_bound(self) -> int | None:
        return self.maximum

    def describe(self, maximum: int | None) -> str:
        return bounds_text(self.minimum, maximum)


class ThreadCount(WholeNumber):
    """A thread count: at least 1, at most this device's logical CPUs (more only slows a run down)."""

    def __init__(self) -> None:
        super().__init__(1)

    def upper_bound(self) -> int:
        return os.cpu_count() or 1

    def describe(self, maximum: int | None) -> str:
        return f"{bounds_text(1, maximum)}, the logical CPUs of this device"


class FiniteNumber(click.ParamType):
    """A finite number (never nan or inf) within bounds; ``above`` makes the minimum exclusive."""

    name = "number"

    def __init__(self, minimum: float | None = None, maximum: float | None = None, *, above: bool = False) -> None:
        self.minimum, self.maximum, self.above = minimum, maximum, above

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"must be a finite number (got {value})", param, ctx)
        low = self.minimum is not None and (number <= self.minimum if self.above else number < self.minimum)
        if low or (self.maximum is not None and number > self.maximum):
            self.fail(f"must be {bounds_text(self.minimum, self.maximum, above=self.above)} (got {number:g})",
                      param, ctx)
        return number


class ModelName(click.ParamType):
    """A ``--model`` value: anything but empty (an empty one would silently mean the default)."""

    name = "model"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if not str(value).strip():
            default = " (leave the option out for the default)" if isinstance(param, click.Option) else ""
            self.fail(f"empty; name a model file, a folder or a model{default}", param, ctx)
        return str(value)


class CommaList(click.ParamType):
    """Comma-separated values of another type (``2,4``), as a tuple; empty items are skipped."""

    def __init__(self, item: click.ParamType) -> None:
        self.item = item
        self.name = f"{item.name},..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        items = tuple(self.item.convert(part.strip(), param, ctx) for part in str(value).split(",") if part.strip())
        if not items:
            self.fail(f"expected one or more comma-separated values, e.g. {self.example()}", param, ctx)
        return items

    def example(self) -> str:
        return "2,4" if isinstance(self.item, WholeNumber) else "a,b"


class WorkerAddresses(click.ParamType):
    """``HOST:PORT,...`` of llama.cpp RPC workers (``rpc.parse_workers`` says what is wrong)."""

    name = "host:port,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        from edge_runtime.backends.llamacpp.rpc import parse_workers
        from edge_runtime.errors import InvalidConfigError

        try:
            workers = parse_workers(str(value))
        except InvalidConfigError as exc:
            self.fail(f"{exc.message} ({exc.hint})" if exc.hint else exc.message, param, ctx)
        if not workers:
            self.fail("empty; name one or more workers as HOST:PORT,HOST:PORT", param, ctx)
        return workers


THREADS = ThreadCount()
SEED = WholeNumber(0, MAX_SEED)
MODEL = ModelName()
CTX = WholeNumber(16)
# llama.cpp's own names (llama-server's -ctk/-ctv), those backends.base.KV_CACHE_TYPES maps (not
# imported here: the backends are too heavy for `--help`); the planner picks one when memory is tight.
KV_CACHE_TYPE_NAMES = ("f16", "bf16", "f32", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
KV_CACHE_TYPE = click.option(
    "--kv-cache-type", type=click.Choice(KV_CACHE_TYPE_NAMES), default=None,
    help="llama.cpp's KV cache type (default: the plan's: f16, or q8_0/q4_0 when the profile's context "
         "does not fit otherwise); a quantized cache runs with flash attention.")
WORKERS = click.option(
    "--workers", type=WorkerAddresses(), default=(), show_default=False,
    help="Split the model across these llama.cpp RPC workers (`edgert worker` on each): the layers their memory "
         "holds go there, the rest stay here. Needs scripts/enable_rpc.sh.")


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that loads a model and generates."""
    options = [
        click.option("--model", "-m", "model", type=MODEL, default=None, help=MODEL_HELP),
        click.option("--backend", default=None, help="Force a backend (llama.cpp, onnx, tflite)."),
        click.option("--ctx", type=CTX, default=None,
                     help="Context size in tokens (default: the plan's, from the device profile)."),
        click.option("--threads", type=THREADS, default=None,
                     help="CPU threads, at most the logical CPUs (default: physical cores)."),
        click.option("--temp", type=FiniteNumber(0.0), default=0.7, show_default=True,
                     help="Sampling temperature; 0 is greedy."),
        click.option("--top-k", type=WholeNumber(0), default=40, show_default=True),
        click.option("--top-p", type=FiniteNumber(0.0, 1.0), default=0.95, show_default=True),
        click.option("--min-p", type=FiniteNumber(0.0, 1.0), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=FiniteNumber(0.0, MAX_REPEAT_PENALTY, above=True),
                     default=1.0, show_default=True),
        click.option("--seed", type=SEED, default=None, help=f"Sampling seed, 0 to {MAX_SEED} (default: random)."),
        click.option("--max-tokens", type=WholeNumber(1), default=512, show_default=True,
                     help="Most tokens per answer."),
        click.option("--stats", is_flag=True, help="After each answer, a key=value line on stderr."),
        KV_CACHE_TYPE,
        WORKERS,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def plan_from_options(opts: dict[str, Any], profile_id: str | None = None, *, parallel: int = 1,
                      force: bool = False) -> Any:
    """The plan for the model and overrides the options name (``edge_runtime.plan``)."""
    from edge_runtime import plan
    from edge_runtime.errors import InvalidConfigError

    kv = opts.get("kv_cache_type")
    chosen = plan(opts["model"], backend=opts.get("backend"), ctx=opts.get("ctx"), threads=opts.get("threads"),
                  parallel=parallel, kv_cache_type=kv, profile=profile_id, force=force,
                  workers=opts.get("workers") or ())
    if kv is not None and chosen.backend != "llama.cpp":
        raise InvalidConfigError(f"--kv-cache-type {kv}: {chosen.backend} keeps its own KV cache "
                                 "(only llama.cpp has a choice of types)", "leave --kv-cache-type out")
    return chosen


def load_planned(opts: dict[str, Any]) -> tuple[Any, Any]:
    """(model, plan): the planned artifact loaded on the planned backend, with the prompt cache
    its command's options ask for."""
    from edge_runtime.backends import open_artifact

    chosen = plan_from_options(opts)
    return with_prompt_cache(open_artifact(chosen.artifact, chosen.settings, backend=chosen.backend), opts), chosen


class ByteSize(click.ParamType):
    """A number of bytes: ``536870912``, ``512M``, ``512MiB``, ``2G`` (powers of 1024)."""

    name = "bytes"
    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    MINIMUM = 1 << 20  # below this no saved state of a real model fits: the bound would evict every save

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        else:
            text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
            unit = text[-1:] if text[-1:] in self._UNITS and text[-1:] else ""
            digits = text[: len(text) - len(unit)].strip()
            if not digits.isdigit():
                self.fail(f"{value!r} is not a size (such as 536870912, 512M or 2G)", param, ctx)
            size = int(digits) * self._UNITS[unit]
        if size < self.MINIMUM:
            self.fail(f"{value!r} is less than the minimum, 1M (use --no-prompt-cache to turn it off)", param, ctx)
        return size


def prompt_cache_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--no-prompt-cache`` and ``--prompt-cache-bytes``, for the commands that generate."""
    from edge_runtime.models.prompt_cache import DEFAULT_MAX_BYTES

    func = click.option(
        "--prompt-cache-bytes", "prompt_cache_bytes", type=ByteSize(), default=DEFAULT_MAX_BYTES,
        show_default="512M", help="Bound of the prompt cache on disk (least recently used out first).")(func)
    return click.option(
        "--no-prompt-cache", "no_prompt_cache", is_flag=True,
        help="Keep the prompt cache on disk off: no saved KV state is read or written "
             "($EDGERT_HOME/prompt-cache; prefix reuse in memory stays).")(func)


def with_prompt_cache(model: Any, opts: dict[str, Any]) -> Any:
    """``model`` saving and restoring prompts in the store on disk, unless ``--no-prompt-cache``
    (commands without the options leave it off)."""
    from edge_runtime.models.prompt_cache import PromptCacheStore, attach

    if "no_prompt_cache" in opts and not opts["no_prompt_cache"]:
        attach(model, PromptCacheStore.default(opts["prompt_cache_bytes"]))
    return model


RESPONSE_CACHE = click.option(
    "--response-cache", "response_cache", is_flag=True,
    help="Answer exact repeats of greedy requests (temperature 0) from a cache on disk "
         "($EDGERT_HOME/response-cache, at most 64 MiB, least recently used out first).")
JSON_SCHEMA = click.option(
    "--json-schema", "json_schema", metavar="FILE", default=None,
    help="A JSON file holding a JSON Schema: every answer is JSON that follows it.")
MAX_SCHEMA_BYTES = 1 << 20


def read_json_schema(path: str) -> dict[str, Any]:
    """The JSON Schema in the file ``path``; a missing, oversized or malformed file is one error line."""
    from edge_runtime.errors import InvalidConfigError
    from edge_runtime.files import parse_json, read_regular_file

    hint = "give a JSON file holding one schema object, such as {\"type\": \"object\"}"
    schema = parse_json(read_regular_file(path, MAX_SCHEMA_BYTES, "JSON Schema file"), path, hint)
    if not isinstance(schema, dict):
        raise InvalidConfigError(f"{path}: a JSON Schema is an object, not {type(schema).__name__}", hint)
    return schema


def sampling_params(opts: dict[str, Any]) -> Any:
    """The sampling options as ``SamplingParams`` (``--json-schema``'s file read here)."""
    from edge_runtime.backends.base import SamplingParams

    schema = opts.get("json_schema")
    return SamplingParams(
        max_tokens=opts["max_tokens"], temperature=opts["temp"], top_k=opts["top_k"],
        top_p=opts["top_p"], min_p=opts["min_p"], repeat_penalty=opts["repeat_penalty"],
        seed=opts["seed"], json_schema=read_json_schema(schema) if schema is not None else None,
    )
