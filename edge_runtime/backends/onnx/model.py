"""A loaded ONNX model: tokenizer, slots (one genai generator each) and the generation loop.

Each slot owns a genai generator, whose KV cache holds ``max_length = n_ctx`` positions, and the
tokens evaluated into it. A call rewinds the cache to the prefix its prompt shares with those
tokens and evaluates only the rest, in chunks, then picks tokens from the logits one by one.
Generation runs on the consumer's thread; slots let a server run several conversations at once
(each on its own generator, sharing the model's weights).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edge_runtime.backends.base import (
    CancelToken,
    EvaluatedPrefix,
    GenerationStats,
    ModelInfo,
    SamplingParams,
    Settings,
    TokenEvent,
    check_prompt,
    default_threads,
)
from edge_runtime.backends.onnx import native
from edge_runtime.backends.text import StreamingText
from edge_runtime.errors import GenerationError, ModelLoadError, SlotsBusyError
from edge_runtime.formats.onnx import OnnxFolder, read_onnx_folder

# End-of-turn tokens chat models emit besides their EOS (llama.cpp stops on these too).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>")


class OnnxTokenizer:
    """Text ↔ tokens: Hugging Face ``tokenizers`` when installed (exact, and it can leave control
    tokens in user text unparsed), else genai's own tokenizer (which always parses them)."""

    def __init__(self, folder: OnnxFolder, og_model: Any) -> None:
        self._og = native.load_tokenizer(og_model)
        self._hf = self._plain = None
        path = folder.path / "tokenizer.json"
        try:
            from tokenizers import Tokenizer
        except ImportError:
            Tokenizer = None
        if Tokenizer is not None and path.is_file():
            self._hf = Tokenizer.from_file(str(path))
            self._plain = Tokenizer.from_file(str(path))
            self._plain.encode_special_tokens = True  # control-token text stays text

    def encode(self, text: str, *, special: bool) -> list[int]:
        if self._hf is None:
            return [int(t) for t in self._og.encode(text)]
        tok = self._hf if special else self._plain
        return tok.encode(text, add_special_tokens=False).ids

    def adds_bos(self, bos_id: int | None, config: dict[str, Any]) -> bool:
        """Whether the model's tokenizer puts BOS first (measured where possible)."""
        if bos_id is None:
            return False
        if self._hf is not None:
            ids = self._hf.encode("a", add_special_tokens=True).ids
            return bool(ids) and ids[0] == bos_id
        return bool(config.get("add_bos_token", False))

    def decode(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """Text of ``tokens``; ``special`` keeps control tokens (so it tokenizes back the same)."""
        if not tokens:
            return ""
        if self._hf is not None:
            return self._hf.decode(list(tokens), skip_special_tokens=not special)
        import numpy as np

        return self._og.decode(np.asarray(list(tokens), dtype=np.int32))

    def stream(self) -> IncrementalText:
        """A decoder that turns one token at a time into text (control tokens left out)."""
        return IncrementalText(lambda tokens: self.decode(tokens, special=False))

    def token_id(self, text: str) -> int | None:
        if self._hf is not None:
            return self._hf.token_to_id(text)
        return None


class IncrementalText:
    """Text of a growing token list, released piece by piece, as whole characters.

    Each step decodes a short window (from the last point where the text was settled) with and
    without the new token and releases the difference, unless it ends in an incomplete
    character. Decoding windows rather than single tokens keeps whatever the tokenizer's decoder
    does across token boundaries (byte fallback, SentencePiece spaces) exactly as a full decode.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._tokens: list[int] = []
        self._start = 0  # window start: the text before it is settled
        self._read = 0  # tokens up to here are released

    def push(self, token: int) -> str:
        self._tokens.append(token)
        before = self._decode(self._tokens[self._start:self._read])
        after = self._decode(self._tokens[self._start:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._start, self._read = self._read, len(self._tokens)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is still held back (an incomplete character becomes U+FFFD)."""
        before = self._decode(self._tokens[self._start:self._read])
        after = self._decode(self._tokens[self._start:])
        self._start = self._read = len(self._tokens)
        return after[len(before):]


class OnnxSlot:
    """One sequence (genai generator) of a model, used by one generation at a time."""

    def __init__(self, model: OnnxModel) -> None:
        self._model = model
        self.prefix = EvaluatedPrefix()
        self.last_used = 0.0
        self._seq: native.GenaiSequence | None = None

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Exactly ``Model.generate``, on this slot's cache."""
        tokens = self._model.check_prompt(tokens)
        return self._stream(tokens, params, cancel or CancelToken())

    def clear(self) -> None:
        """Forget what the cache holds (the next call rewinds to zero and evaluates it all)."""
        self.prefix.tokens.clear()

    def forget(self) -> None:
        """Drop the generator itself (after a failure, or to free its memory)."""
        self._seq = None
        self.prefix.tokens.clear()

    def _reuse(self, tokens: list[int]) -> tuple[native.GenaiSequence, int]:
        # The last prompt token is always evaluated again: its logits pick the first new token.
        kept = min(self.prefix.common_length(tokens), len(tokens) - 1)
        if self._seq is None:
            # A generator allocates its whole KV cache up front: made once, then rewound.
            self._seq = native.GenaiSequence(self._model.og_model,
                                             self._model.folder.cache_positions(self._model.info.n_ctx))
            kept = 0
        else:
            self._seq.rewind_to(kept)
        del self.prefix.tokens[kept:]
        return self._seq, kept

    def _stream(self, tokens: list[int], params: SamplingParams, cancel: CancelToken) -> Iterator[TokenEvent]:
        started = time.perf_counter()
        model = self._model
        text = StreamingText(params.stop)
        picker = native.TokenPicker(params)
        decoder = model.tokenizer.stream()
        history = list(tokens)
        n_gen, evaluated, prefill_end, first_at, reason = 0, 0, 0.0, 0.0, "length"
        try:
            seq, kept = self._reuse(tokens)
            todo = tokens[kept:]
            while todo and not cancel.cancelled:  # chunks bound the logits buffer, and Ctrl-C waits less
                chunk, todo = todo[:native.PREFILL_CHUNK], todo[native.PREFILL_CHUNK:]
                seq.append(chunk)
                self.prefix.tokens.extend(chunk)
                evaluated += len(chunk)
            while True:
                if cancel.cancelled:
                    reason = "cancelled"
                    break
                logits = seq.last_logits()
                if n_gen == 0:
                    prefill_end = time.perf_counter()
                token = picker.pick(logits, history)
                if token in model.stop_ids:
                    reason = "stop"
                    break
                n_gen += 1
                if n_gen == 1:
                    first_at = time.perf_counter()
                piece = text.push(decoder.push(token).encode("utf-8"))
                if text.stopped:
                    reason = "stop"
                    if piece:
                        yield TokenEvent(token, piece)
                    break
                yield TokenEvent(token, piece)
                if n_gen >= params.max_tokens or len(self.prefix.tokens) + 1 >= model.info.n_ctx:
                    break
                seq.append([token])
                self.prefix.tokens.append(token)
                history.append(token)
        except GeneratorExit:
            raise  # abandoned between tokens: the cache and the prefix still agree
        except BaseException:
            self.forget()  # a step that failed half-way: trust nothing in the cache
            raise
        end = time.perf_counter()
        stats = GenerationStats(
            prompt_tokens=len(tokens), cached_tokens=kept, evaluated_tokens=evaluated, gen_tokens=n_gen,
            ttft_s=(first_at or end) - started, prefill_s=(prefill_end or end) - started,
            decode_s=end - first_at if n_gen else 0.0,
        )
        if not text.stopped:
            text.push(decoder.flush().encode("utf-8"))
        yield TokenEvent(None, text.flush(), reason, stats)


class OnnxModel:
    """An ONNX folder loaded in onnxruntime-genai, with ``Settings.n_parallel`` slots."""

    def __init__(self, path: str, settings: Settings) -> None:
        self.folder = read_onnx_folder(path)  # our checks first: bad folders never reach onnxruntime
        self.path = str(self.folder.path)
        n_ctx = min(settings.n_ctx, self.folder.max_length) if settings.n_ctx > 0 else self.folder.max_length
        self.settings = Settings.from_dict({**settings.to_dict(), "n_ctx": n_ctx})
        self.n_threads = settings.n_threads or default_threads()
        self.provider = choose_provider(self.folder)
        try:
            self.og_model = native.load_model(self.path, n_threads=self.n_threads, provider=self.provider)
        except ModelLoadError as exc:
            if self.folder.providers and self.provider is None:  # built for a GPU this machine lacks
                wanted = ", ".join(self.folder.providers)
                raise ModelLoadError(exc.message, f"it was built for the {wanted} execution provider, which "
                                     "onnxruntime does not offer here: convert it for cpu") from None
            raise
        self.tokenizer = OnnxTokenizer(self.folder, self.og_model)
        self.info = self._model_info(n_ctx)
        self.stop_ids = frozenset(self._stop_ids())
        self._slots = [OnnxSlot(self) for _ in range(max(1, settings.n_parallel))]
        self._free = list(self._slots)
        self._cond = threading.Condition()
        self._closed = False

    def _model_info(self, n_ctx: int) -> ModelInfo:
        folder, tok_config = self.folder, self.folder.tokenizer_config
        bos, eos = folder.bos_id, folder.eos_ids[0] if folder.eos_ids else None
        name = folder.path.name
        if folder.precision and name.endswith(f"-{folder.precision}-onnx"):
            name = name[: -len(f"-{folder.precision}-onnx")]
        return ModelInfo(
            name=name, arch=folder.arch, quant=folder.precision, n_ctx_train=folder.max_length, n_ctx=n_ctx,
            n_vocab=folder.n_vocab, n_params=folder.n_params or 0, size_bytes=folder.size_bytes,
            chat_template=chat_template(folder.path, tok_config),
            bos_token=_token_text(tok_config.get("bos_token")) or self._id_text(bos),
            eos_token=_token_text(tok_config.get("eos_token")) or self._id_text(eos),
            add_bos=self.tokenizer.adds_bos(bos, tok_config),
        )

    def _id_text(self, token: int | None) -> str | None:
        return self.tokenizer.decode([token], special=True) if token is not None else None

    def _stop_ids(self) -> set[int]:
        ids = set(self.folder.eos_ids)
        for text in END_OF_TURN:
            found = self.tokenizer.token_id(text)
            if found is not None:
                ids.add(found)
        return ids

    # -- text ------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Tokens of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        tokens = self.tokenizer.encode(text, special=special)
        bos = self.folder.bos_id
        if add_bos and self.info.add_bos and bos is not None and tokens[:1] != [bos]:
            tokens.insert(0, bos)
        return tokens

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``, control tokens included, so it tokenizes back to the same ids."""
        return self.tokenizer.decode(tokens, special=True)

    # -- generation ------------------------------------------------------------------------

    def check_prompt(self, tokens: Sequence[int]) -> list[int]:
        """The prompt as a list; see ``base.check_prompt`` for what raises."""
        return check_prompt(tokens, self.info)

    def generate(self, tokens: Sequence[int], params: SamplingParams, *,
                 cancel: CancelToken | None = None) -> Iterator[TokenEvent]:
        """Stream tokens continuing ``tokens``, reusing whatever prefix the cache already holds.

        A prompt that is empty or does not fit the context raises here, before any streaming.
        """
        tokens = self.check_prompt(tokens)
        if self._closed:
            raise GenerationError("the model is closed")
        if len(self._slots) == 1 and not self._free:
            raise GenerationError("this model is already generating", "wait for the answer in progress")
        return self._generate_in_slot(tokens, params, cancel)

    def _generate_in_slot(self, tokens: list[int], params: SamplingParams,
                          cancel: CancelToken | None) -> Iterator[TokenEvent]:
        with self.acquire_slot(tokens) as slot:
            yield from slot._stream(tokens, params, cancel or CancelToken())

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, Any]]:
        """Evaluate ``tokens`` from position 0 and yield (position, logit rows) from ``first`` on.

        For quality measurement: every position's logits, ``native.PREFILL_CHUNK`` tokens at a time, in a
        generator of its own (the slots' caches are left as they are).
        """
        tokens = self.check_prompt(tokens)
        seq = native.GenaiSequence(self.og_model, self.folder.cache_positions(self.info.n_ctx))
        for pos in range(0, len(tokens), native.PREFILL_CHUNK):
            chunk = tokens[pos:pos + native.PREFILL_CHUNK]
            seq.append(chunk)
            if pos + len(chunk) > first:
                rows = seq.appended_logits()[max(0, first - pos):]
                yield max(first, pos), rows

    @contextmanager
    def acquire_slot(self, prompt: Sequence[int] | None = None, timeout: float | None = None) -> Iterator[OnnxSlot]:
        """A free slot, preferring the one whose cache shares most with ``prompt``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free, timeout=timeout):
                raise SlotsBusyError(f"all {len(self._slots)} slots are busy")
            slot = max(self._free, key=lambda s: (s.prefix.common_length(prompt or ()), -s.last_used))
            self._free.remove(slot)
        try:
            yield slot
        finally:
            slot.last_used = time.monotonic()
            with self._cond:
                self._free.append(slot)
                self._cond.notify()

    def reset(self) -> None:
        """Forget the cache of every idle slot (their next call evaluates the whole prompt)."""
        with self._cond:
            for slot in self._free:
                slot.clear()

    def close(self) -> None:
        """Free the generators and the model; safe to call twice."""
        self._closed = True
        with self._cond:
            for slot in self._slots:
                slot.forget()
        self.og_model = None

    def __enter__(self) -> OnnxModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def choose_provider(folder: OnnxFolder) -> str | None:
    """The execution provider the model was built for, if onnxruntime offers it here; else CPU."""
    import onnxruntime

    available = {native.PROVIDER_NAMES.get(p) for p in onnxruntime.get_available_providers()}
    return next((p for p in folder.providers if p in available), None)


def chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    """The chat template from tokenizer_config.json, else from chat_template.jinja."""
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        return template
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
