"""Constrained decoding for every backend: llguidance grammars, compiled once per model, one matcher per answer.

``SamplingParams.json_schema`` or ``.grammar`` becomes an llguidance grammar definition
(``grammar_definition``). A model's ``GrammarCompiler`` checks it against the model's own
llguidance tokenizer (built on the first constrained request, or the first logprobs of a
tokenizer.json model, which take token bytes from it; never before: an unconstrained model pays
nothing) and keeps the compiled matcher in a small LRU keyed by the definition. Each
generation then runs a ``GrammarState``, a copy of that template: before each token it fills the
bitmask of the tokens the grammar allows next, and it takes the chosen token. The llama.cpp
backend applies the mask inside its native sampler chain, the numpy backends in the shared
``Sampler``; both end the answer with ``stop`` as soon as the grammar is complete.

JSON whitespace: free whitespace (llguidance's default) lets a small model loop on blanks and
newlines until ``max_tokens``, and none at all (compact JSON) pushes it off the pretty-printed
JSON it writes, so it loops on values instead (SmolLM2-135M: 0 of 10 greedy answers valid).
The default here is bounded: each place JSON allows whitespace takes at most 16 spaces or
newlines (``JSON_WHITESPACE``), which keeps what the model writes (10 of 10 greedy, 19 of 20
sampled answers valid) and still ends. A schema with its own top-level ``"x-guidance"`` object
decides alone: ``{"x-guidance": {"whitespace_flexible": false}}`` asks for compact JSON.

The end-of-generation ids given to the tokenizer are all of the model's (llama.cpp's EOG set,
or the HF tokenizer's end ids), so the mask allows every one of them exactly when the grammar
accepts. A matcher from the llama.cpp vocabulary keeps a pointer to it: ``close`` drops the
tokenizer and every template before the model is freed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends.params import Grammar, SamplingParams
from edge_runtime.errors import GenerationError, InvalidRequestError, UnsupportedModelError

JSON_WHITESPACE = r"[\x20\x0A]{0,16}"
TEMPLATES_KEPT = 32  # compiled grammars per model (a few MB at most for typical schemas)


def grammar_definition(params: SamplingParams) -> str | None:
    """The llguidance grammar definition ``params`` asks for; None when nothing constrains it."""
    if params.json_schema is None and params.grammar is None:
        return None  # before the import: an unconstrained answer never loads llguidance
    from llguidance import LLMatcher, grammar_from

    if params.json_schema is not None:
        schema = params.json_schema
        defaults = None if "x-guidance" in schema else {"whitespace_pattern": JSON_WHITESPACE}
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
        except (ValueError, TypeError) as exc:
            raise InvalidRequestError(f"json_schema cannot be used: {_first_line(exc)}") from None
    grammar = params.grammar
    if grammar is None:
        return None
    if isinstance(grammar, str):
        return LLMatcher.grammar_from_lark(grammar)
    if grammar.syntax == "regex":
        return LLMatcher.grammar_from_regex(grammar.text)
    if grammar.syntax == "lark":
        return LLMatcher.grammar_from_lark(grammar.text)
    try:
        return grammar_from("gbnf", grammar.text)
    except ValueError as exc:
        raise InvalidRequestError(f"the GBNF grammar is invalid: {_first_line(exc)}") from None


def _described(params: SamplingParams) -> str:
    if params.json_schema is not None:
        return "json_schema"
    if isinstance(params.grammar, Grammar):
        return {"regex": "regex", "lark": "Lark grammar", "gbnf": "GBNF grammar"}[params.grammar.syntax]
    return "Lark grammar"


def _first_line(error: object) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "no reason given"


class GrammarCompiler:
    """One model's grammar side: its llguidance tokenizer, made on first use, and the compiled grammars.

    ``make_tokenizer`` builds the ``llguidance.LLTokenizer`` (about half a second for a 49k
    vocabulary); ``n_vocab`` is the width of the model's logits, which the masks cover.
    Thread-safe: requests compile on their callers' threads.
    """

    def __init__(self, make_tokenizer: Callable[[], Any], n_vocab: int) -> None:
        self._make_tokenizer = make_tokenizer
        self.n_vocab = n_vocab
        self._tokenizer: Any = None
        self._unreadable: str | None = None  # why the tokenizer could not be built, once it failed
        self._templates: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    @property
    def tokenizer_built(self) -> bool:
        """Whether the tokenizer is made (a constrained request or logprobs' bytes make it; a plain one never does)."""
        return self._tokenizer is not None

    def compile(self, params: SamplingParams) -> Any:
        """The template matcher of ``params``' grammar (None when unconstrained).

        A grammar or schema llguidance refuses raises ``InvalidRequestError`` with its reason,
        before any generation starts.
        """
        definition = grammar_definition(params)
        if definition is None:
            return None
        from llguidance import LLMatcher

        with self._lock:
            if self._closed:
                raise GenerationError("the model is closed")
            template = self._templates.get(definition)
            if template is not None:
                self._templates.move_to_end(definition)
                return template
            tokenizer = self._tokenizer_locked()
            what = _described(params)
            error = LLMatcher.validate_grammar(definition, tokenizer)
            if error:
                raise InvalidRequestError(f"the {what} cannot be used: {_first_line(error)}",
                                          f"fix the {what} and send it again")
            template = LLMatcher(tokenizer, definition, log_level=0)
            if template.is_error():
                raise InvalidRequestError(f"the {what} cannot be used: {_first_line(template.get_error())}")
            self._templates[definition] = template
            while len(self._templates) > TEMPLATES_KEPT:
                self._templates.popitem(last=False)
            return template

    def token_bytes(self, token: int) -> bytes | None:
        """The bytes of one token in the tokenizer (a piece of a UTF-8 character stays that piece,
        a control token is its text), for logprobs: a library that reads every tokenizer.json
        kind rather than a byte map of our own. None when llguidance cannot read this tokenizer
        (the caller falls back to the token's text). Only the first call waits for the build:
        the rest never take the lock a long grammar compile holds."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            with self._lock:
                if self._closed:
                    raise GenerationError("the model is closed")
                try:
                    tokenizer = self._tokenizer_locked()
                except UnsupportedModelError:
                    return None
        return bytes(tokenizer.decode_bytes([token]))

    def _tokenizer_locked(self) -> Any:
        if self._tokenizer is None:
            if self._unreadable is not None:  # tried once: a second build would fail the same way
                raise UnsupportedModelError(self._unreadable)
            try:
                self._tokenizer = self._make_tokenizer()
            except (ValueError, RuntimeError, OSError) as exc:
                self._unreadable = f"constrained decoding cannot read this model's tokenizer: {_first_line(exc)}"
                raise UnsupportedModelError(self._unreadable) from None
        return self._tokenizer

    def close(self) -> None:
        """Drop the tokenizer and the templates (before the model they may point into is freed)."""
        with self._lock:
            self._closed = True
            self._templates.clear()
            self._tokenizer = None


def tokenizer_json_compiler(path: Path, n_vocab: int, end_ids: Iterable[int]) -> GrammarCompiler:
    """The ``GrammarCompiler`` of a model whose tokenizer is a ``tokenizer.json`` (ONNX, TFLite).

    ``n_vocab`` is the logits' width (a padded head is wider than the vocabulary; the padding is
    never allowed); ``end_ids`` are every id that ends a generation, not llguidance's one guess.
    """

    def make_tokenizer() -> Any:
        from llguidance import LLTokenizer

        return LLTokenizer(str(path), n_vocab=n_vocab, eos_token=sorted(end_ids))

    return GrammarCompiler(make_tokenizer, n_vocab)


class GrammarState:
    """One generation's matcher: the mask of the next token, the tokens taken, whether it is done.

    The mask is one row (``row``) of an int32 ``bitmask`` (llguidance's layout: bit ``t % 32`` of
    word ``t // 32``); a state gets a row of a shared array when several are filled together.
    """

    def __init__(self, template: Any, n_vocab: int, bitmask: np.ndarray | None = None, row: int = 0) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.matcher = template.deep_copy()
        self.n_vocab = n_vocab
        self.bitmask = allocate_token_bitmask(1, n_vocab) if bitmask is None else bitmask
        self.row = row

    def fill(self) -> None:
        """Compute the mask of the next token."""
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self.bitmask, self.row)

    def allowed(self) -> np.ndarray:
        """The last mask filled, as one bool per token of the logits."""
        return np.unpackbits(self.bitmask[self.row].view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)

    def consume(self, token: int) -> None:
        """Advance past ``token``; a token the grammar refuses raises (the mask never offers one)."""
        if not self.matcher.consume_token(token):
            raise GenerationError(f"the grammar refused token {token}: {self.matcher.get_error() or 'no reason'}")

    @property
    def stopped(self) -> bool:
        """Whether the grammar is complete: nothing but the end of generation may follow."""
        return bool(self.matcher.is_stopped())


class MaskRows:
    """The masks of a model's sequences, one row each, filled together after each step.

    Several rows go in one llguidance call, on its own threads with the GIL released; the
    scheduler thread makes that call itself, since a mask computed on another Python thread
    waits for the GIL behind the busy one.
    """

    def __init__(self, n_rows: int, n_vocab: int, threads: int = 2) -> None:
        from llguidance.numpy import allocate_token_bitmask

        self.bitmask = allocate_token_bitmask(n_rows, n_vocab)
        self.n_vocab = n_vocab
        self._threads = threads
        self._executor: Any = None

    def start(self, template: Any, row: int) -> GrammarState:
        """A new generation's state whose mask is row ``row``."""
        return GrammarState(template, self.n_vocab, self.bitmask, row)

    def fill(self, states: Sequence[GrammarState]) -> None:
        """Compute the next-token masks of ``states`` (all rows of this array)."""
        if len(states) == 1:
            states[0].fill()
            return
        from llguidance import LLExecutor
        from llguidance.numpy import fill_next_token_bitmask_par

        if self._executor is None:
            self._executor = LLExecutor(num_threads=self._threads)
        fill_next_token_bitmask_par(self._executor, [(s.matcher, s.row) for s in states], self.bitmask)
