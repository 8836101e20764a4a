"""What a generation asks for: ``SamplingParams`` and the ``Grammar`` it may carry, checked when made.

``backends.base`` re-exports both with the other seam data; the checks live here so that the
Python API refuses a bad value (``InvalidRequestError``, a 400 from the server) before any model
sees it, whoever builds the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_runtime.errors import InvalidRequestError
from edge_runtime.limits import MAX_C_INT, MAX_REPEAT_PENALTY, MAX_SEED

GRAMMAR_SYNTAXES = ("regex", "lark", "gbnf")
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries; each one costs llama.cpp a search when a grammar reorders the candidates


@dataclass(frozen=True)
class Grammar:
    """A grammar in one of llguidance's syntaxes: ``Grammar("regex", r"\\d{3}")``, ``"lark"`` or ``"gbnf"``."""

    syntax: str
    text: str

    def __post_init__(self) -> None:
        if self.syntax not in GRAMMAR_SYNTAXES:
            raise InvalidRequestError(f"grammar syntax must be one of {', '.join(GRAMMAR_SYNTAXES)}, "
                                      f"not {self.syntax!r}")
        if not isinstance(self.text, str) or not self.text.strip():
            raise InvalidRequestError("grammar text must be a non-empty string")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` means greedy.

    Every backend runs the same chain: the grammar's mask (``json_schema`` or ``grammar``), then
    ``logit_bias``, the penalties (``repeat_penalty``, ``frequency_penalty``, ``presence_penalty``
    over the last ``repeat_last_n`` tokens of prompt and answer, -1: all of them), then greedy or
    top-k, top-p, min-p, the temperature and a draw seeded by ``seed``.

    ``json_schema`` (a JSON Schema; ``{"type": "object"}`` is OpenAI's ``json_object``) or
    ``grammar`` (a Lark string, llguidance's dialect with ``%json``, or a ``Grammar``) constrains
    the answer; only one at a time, and ``stop`` strings are ignored under either, since the
    grammar says where the answer ends and a stop string could cut it mid-structure (see
    ``backends.constraints`` for the JSON whitespace rule). ``logprobs``: None (off, no extra
    work), 0 (each token's log-probability) or 1..20 (plus that many top alternatives), from the
    model's raw logits (``TokenEvent.logprob``). Bad values raise ``InvalidRequestError`` naming
    the field and its range.
    """

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None  # token id -> added to its logit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | Grammar | None = None

    def __post_init__(self) -> None:
        _check_number("max_tokens", self.max_tokens, 1, MAX_C_INT, integer=True)
        _check_number("temperature", self.temperature, 0, 100)
        _check_number("top_k", self.top_k, 0, MAX_C_INT, integer=True)
        _check_number("top_p", self.top_p, 0, 1)
        _check_number("min_p", self.min_p, 0, 1)
        _check_number("repeat_penalty", self.repeat_penalty, 0.01, MAX_REPEAT_PENALTY)
        _check_number("repeat_last_n", self.repeat_last_n, -1, MAX_C_INT, integer=True)
        _check_number("presence_penalty", self.presence_penalty, -2, 2)
        _check_number("frequency_penalty", self.frequency_penalty, -2, 2)
        if self.seed is not None:
            _check_number("seed", self.seed, 0, MAX_SEED, integer=True)
        if self.logprobs is not None:
            _check_number("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS, integer=True)
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidRequestError("stop must be a sequence of strings")
        object.__setattr__(self, "stop", tuple(self.stop))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", _checked_logit_bias(self.logit_bias))
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise InvalidRequestError("json_schema must be a JSON Schema object (a dict)")
        if self.grammar is not None and not isinstance(self.grammar, (str, Grammar)):
            raise InvalidRequestError("grammar must be a Lark string or a Grammar")
        if isinstance(self.grammar, str) and not self.grammar.strip():
            raise InvalidRequestError("grammar must not be empty")
        if self.json_schema is not None and self.grammar is not None:
            raise InvalidRequestError("give json_schema or grammar, not both", "one constraint per request")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def constrained(self) -> bool:
        """Whether a grammar or schema constrains the answer."""
        return self.json_schema is not None or self.grammar is not None

    @property
    def penalized(self) -> bool:
        """Whether any penalty reads the recent tokens."""
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0)


def _check_number(name: str, value: object, low: float, high: float, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(f"{name} must be {kind} from {_bound(low)} to {_bound(high)}, not {value!r}")


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _checked_logit_bias(bias: Mapping[int, float]) -> dict[int, float]:
    if not isinstance(bias, Mapping):
        raise InvalidRequestError("logit_bias must map token ids to biases")
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(f"logit_bias holds {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
    for token, value in bias.items():
        _check_number("a logit_bias token id", token, 0, MAX_C_INT, integer=True)
        _check_number(f"logit_bias[{token}]", value, -100, 100)
    return {int(t): float(v) for t, v in bias.items()}
