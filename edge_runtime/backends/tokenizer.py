"""A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library, with llama.cpp's semantics.

Shared by the backends whose runtime has no tokenizer of its own that we use (ONNX, TFLite).
``encode(text, special=..., add_bos=...)`` behaves as the llama.cpp backend's ``tokenize``:
``special`` decides whether control tokens written in the text (``<|im_start|>``) become their
ids, and ``add_bos`` prepends the BOS id where the model's tokenizer adds one (llama.cpp's
``add_special``). ``tokenizer_config.json`` (or ``chat_template.jinja``) beside it supplies the
chat template and the BOS/EOS tokens; the caller adds the end-of-generation ids its format
records (``generation_config.json``'s, as the converters copy them).

A generation ends on those ids and on the end-of-turn tokens chat models emit besides their EOS
(``END_OF_TURN``, the ones llama.cpp's vocabulary marks as end of generation too), so every
backend stops on the same tokens.

``StreamingDecoder`` turns generated ids into text as they come, the way text-generation
servers do it: the new tokens are decoded together with a few before them and only the text that
grew, and no longer ends in an incomplete character, is released. That is right for byte-level
BPE (a character split over tokens) and SentencePiece (a word's leading space) alike. Control
tokens are left out of the streamed text, as llama.cpp's ``token_to_piece`` leaves them out.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edge_runtime.errors import BackendUnavailableError, InvalidModelFileError, UnsupportedModelError
from edge_runtime.formats.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

_CONTEXT_TOKENS = 4  # tokens before the new ones decoded with them (spaces, split characters)
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves the template
# End-of-turn tokens chat models emit besides their EOS (llama.cpp stops on these too).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "</s>")


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as {"content": ...} objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(value: Any, folder: Path) -> str | None:
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    if isinstance(value, str) and value:
        return value
    jinja = folder / CHAT_TEMPLATE_FILE
    if not jinja.is_file():
        return None
    try:
        return jinja.read_text(encoding="utf-8") or None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidModelFileError(f"{jinja}: unreadable ({exc})") from None


class HFTokenizer:
    """The tokenizer stored beside a model file."""

    def __init__(self, folder: Path, *, bos_id: int | None = None, eos_ids: Sequence[int] = ()) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise BackendUnavailableError(f"the tokenizers library is not installed ({exc})",
                                          'pip install "edge-runtime[onnx]" or "edge-runtime[tflite]"') from None
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise UnsupportedModelError(f"{folder}: no {TOKENIZER_FILE} beside the model",
                                        "convert the model again with `edgert convert`; it writes the tokenizer")
        self.path = path  # constrained decoding builds llguidance's tokenizer from the same file
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise InvalidModelFileError(f"{path}: not a valid tokenizer ({str(exc).splitlines()[0]})") from None
        config = self._read_config(folder / TOKENIZER_CONFIG_FILE)
        self.chat_template = _chat_template(config.get("chat_template"), folder)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = bos_id if bos_id is not None else self._id(self.bos_token)
        if self.bos_token is None and self.bos_id is not None:
            self.bos_token = self._tok.id_to_token(self.bos_id)
        if self.eos_token is None and eos_ids:
            self.eos_token = self._tok.id_to_token(int(eos_ids[0]))
        ends = {int(e) for e in eos_ids}
        ends.update(i for i in map(self._id, (self.eos_token, *END_OF_TURN)) if i is not None)
        self.end_ids = frozenset(ends)
        self.n_vocab = self._tok.get_vocab_size(with_added_tokens=True)
        self.add_bos = self._adds_bos(config)
        self._lock = threading.Lock()  # encode_special_tokens is a setting of the shared tokenizer

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidModelFileError(f"{path}: unreadable ({exc})") from None
        return data if isinstance(data, dict) else {}

    def _id(self, token: str | None) -> int | None:
        return self._tok.token_to_id(token) if token else None

    def _adds_bos(self, config: dict[str, Any]) -> bool:
        # The tokenizer's own post-processor is what transformers applies; an explicit
        # add_bos_token (SentencePiece-style configs) wins where it is written down.
        if isinstance(config.get("add_bos_token"), bool):
            return bool(config["add_bos_token"]) and self.bos_id is not None
        if self.bos_id is None:
            return False
        with_special = self._tok.encode("a", add_special_tokens=True).ids
        return bool(with_special) and with_special[0] == self.bos_id

    def encode(self, text: str, *, special: bool = False, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens, ``add_bos`` prepends BOS when
        the model's tokenizer adds one."""
        with self._lock:
            self._tok.encode_special_tokens = not special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, special: bool = True) -> str:
        """The text of ``ids``; ``special`` renders control tokens (as llama.cpp's detokenize does)."""
        return self._tok.decode(list(ids), skip_special_tokens=not special)

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, an end id of the model, an end-of-turn token)."""
        return token in self.end_ids

    def streaming_decoder(self, context: Sequence[int]) -> StreamingDecoder:
        """A decoder for tokens generated after ``context`` (the prompt); control tokens stay out."""
        return StreamingDecoder(lambda ids: self.decode(ids, special=False), list(context[-_CONTEXT_TOKENS:]))


class StreamingDecoder:
    """Releases the text of generated tokens once it is final (whole characters)."""

    def __init__(self, decode: Callable[[list[int]], str], context: list[int]) -> None:
        self._decode = decode
        self._tokens = context
        self._prefix = 0  # start of the tokens decoded as context
        self._read = len(context)  # tokens whose text has been released

    def push(self, token: int) -> bytes:
        """Add one token; return the UTF-8 bytes now final (maybe none)."""
        self._tokens.append(token)
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return b""  # an incomplete character, or nothing visible yet
        self._prefix, self._read = self._read, len(self._tokens)
        return after[len(before):].encode("utf-8")

    def flush(self) -> bytes:
        """Whatever is held back, at the end of a generation."""
        if self._read >= len(self._tokens):
            return b""
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        self._prefix = self._read = len(self._tokens)
        return after[len(before):].encode("utf-8") if after.startswith(before) else b""
