"""A Hugging Face ``tokenizer.json`` through the ``tokenizers`` library, with llama.cpp's semantics.

``encode(text, special=..., add_bos=...)`` behaves as the llama.cpp backend's ``tokenize``:
``special`` decides whether control tokens written in the text (``<|im_start|>``) become their
ids, and ``add_bos`` prepends the BOS id. ``tokenizer_config.json`` beside it supplies the chat
template and the BOS/EOS tokens; the converter's description (``<file>.json``) adds the
end-of-generation ids from ``generation_config.json``.

``StreamingDecoder`` turns generated ids into text as they come, the way text-generation
servers do it: the new tokens are decoded together with a few before them and only the text that
grew, and no longer ends in an incomplete character, is released. That is right for byte-level
BPE (a character split over tokens) and SentencePiece (a word's leading space) alike.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidModelFileError, UnsupportedModelError
from edge_runtime.formats.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

_CONTEXT_TOKENS = 4  # tokens before the new ones decoded with them (spaces, split characters)


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as {"content": ...} objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _chat_template(value: Any) -> str | None:
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    return value if isinstance(value, str) and value else None


class HFTokenizer:
    """The tokenizer stored beside a model file."""

    def __init__(self, folder: Path, *, bos_id: int | None = None, eos_ids: Sequence[int] = ()) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            from edge_runtime.errors import BackendUnavailableError

            raise BackendUnavailableError(f"the tokenizers library is not installed ({exc})",
                                          'pip install "edge-runtime[tflite]"') from None
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise UnsupportedModelError(f"{folder}: no {TOKENIZER_FILE} beside the model",
                                        "convert the model again with `edgert convert`; it writes the tokenizer")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise InvalidModelFileError(f"{path}: not a valid tokenizer ({str(exc).splitlines()[0]})") from None
        config = self._read_config(folder / TOKENIZER_CONFIG_FILE)
        self.chat_template = _chat_template(config.get("chat_template"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_id = bos_id if bos_id is not None else self._id(self.bos_token)
        if self.bos_token is None and self.bos_id is not None:
            self.bos_token = self._tok.id_to_token(self.bos_id)
        ends = {int(e) for e in eos_ids}
        if self._id(self.eos_token) is not None:
            ends.add(self._id(self.eos_token))  # type: ignore[arg-type]
        self.eos_ids = frozenset(ends)
        if self.eos_token is None and ends:
            self.eos_token = self._tok.id_to_token(min(ends))
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
        """Token ids of ``text``; ``special`` parses control tokens, ``add_bos`` prepends BOS."""
        with self._lock:
            self._tok.encode_special_tokens = not special
            ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included (as llama.cpp's detokenize renders them)."""
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (EOS, or an end id from generation_config)."""
        return token in self.eos_ids

    def streaming_decoder(self, context: Sequence[int]) -> StreamingDecoder:
        """A decoder for tokens generated after ``context`` (the prompt)."""
        return StreamingDecoder(self.decode, list(context[-_CONTEXT_TOKENS:]))


class StreamingDecoder:
    """Releases the text of generated tokens once it is final (whole characters)."""

    def __init__(self, decode: Any, context: list[int]) -> None:
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
