"""The tokenizer of a Hugging Face folder, as llama.cpp's GGUF tokenizer metadata.

Two kinds, chosen the way llama.cpp's converter chooses them: a SentencePiece ``tokenizer.model``
(Llama 2, Mistral, TinyLlama) becomes tokenizer model ``llama`` with scores; a byte-level BPE
``tokenizer.json`` (Llama 3, SmolLM2, Qwen2) becomes ``gpt2`` with merges and a named
pre-tokenizer. Special token ids, add-BOS/EOS flags, merges and the chat template come from
``gguf.SpecialVocab``, the gguf package's reader of those same files.

Everything is read and checked by ``read_vocab`` before the output file is opened.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, SpecialVocab
from gguf.constants import TokenType

from edge_runtime.converters.pretokenizers import CHECK_TEXT, detect_pre_tokenizer
from edge_runtime.errors import InvalidModelFileError, UnsupportedModelError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
# Files that shape tokenization or chat formatting; all that exist are hashed into the source id.
TOKENIZER_FILES = (TOKENIZER_JSON, TOKENIZER_MODEL, "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "vocab.json", "merges.txt")
SPIECE_UNDERLINE = "\u2581"


@dataclass(frozen=True)
class VocabSpec:
    """Everything the GGUF tokenizer keys need, gathered before writing."""

    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str  # tokenizer.ggml.pre
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    special: SpecialVocab  # merges, special ids, chat template (written by gguf's own helper)
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None

    @property
    def chat_template(self) -> str | None:
        template = self.special.chat_template
        if isinstance(template, list):  # named templates: the default one is "the" template
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        return template if isinstance(template, str) else None


def read_vocab(folder: Path, n_vocab: int) -> VocabSpec:
    """Read and check the tokenizer files of ``folder`` for a model with ``n_vocab`` rows."""
    config = read_json_object(folder / "tokenizer_config.json") or {}
    if (folder / TOKENIZER_MODEL).is_file():
        return _sentencepiece_vocab(folder, n_vocab, config)
    if (folder / TOKENIZER_JSON).is_file():
        return _bpe_vocab(folder, n_vocab, config)
    raise UnsupportedModelError(
        f"{folder}: no tokenizer (neither {TOKENIZER_JSON} nor {TOKENIZER_MODEL})",
        "copy the tokenizer files from the model's repository into the folder",
    )


def write_vocab(w: GGUFWriter, spec: VocabSpec) -> None:
    """Add the tokenizer keys to a writer that has not written its KV data yet."""
    w.add_tokenizer_model(spec.model)
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(list(spec.tokens))
    if spec.scores is not None:
        w.add_token_scores(list(spec.scores))
    w.add_token_types(list(spec.token_types))
    spec.special.add_to_gguf(w, quiet=True)  # add_bos/add_eos included, see _settle_add_flags
    if spec.add_space_prefix is not None:
        w.add_add_space_prefix(spec.add_space_prefix)


def looks_special(text: str) -> bool:
    """Added tokens that behave as control tokens even when not flagged special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>") or (
        text.startswith("<unused") and text.endswith(">"))


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file is absent, an error when it is not an object."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InvalidModelFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InvalidModelFileError(f"{path}: expected a JSON object")
    return data


def _special_vocab(folder: Path, n_vocab: int, merges: bool) -> SpecialVocab:
    # gguf warns about post-processor templates it only half understands (a BOS in the pair
    # template, say); we measure the add-BOS/EOS behaviour ourselves, so those are noise here.
    vocab_log = logging.getLogger("gguf.vocab")
    level = vocab_log.level
    vocab_log.setLevel(logging.ERROR)
    try:
        return SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab)
    except ValueError as exc:
        raise InvalidModelFileError(f"{folder}: tokenizer files disagree ({exc})") from None
    finally:
        vocab_log.setLevel(level)


def _bpe_vocab(folder: Path, n_vocab: int, config: dict[str, Any]) -> VocabSpec:
    from tokenizers import Tokenizer

    path = folder / TOKENIZER_JSON
    tj = read_json_object(path) or {}
    model = tj.get("model") or {}
    decoder = tj.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise UnsupportedModelError(
            f"{path}: only byte-level BPE tokenizer.json is supported "
            f"(this one is {model.get('type')}, decoder {decoder.get('type')})",
            f"a SentencePiece model needs its {TOKENIZER_MODEL} beside it",
        )
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception type for bad files
        raise InvalidModelFileError(f"{path}: cannot be loaded ({exc})") from None
    pre = detect_pre_tokenizer(tok.encode(CHECK_TEXT).ids, tj, str(path))
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= n_vocab:
        raise InvalidModelFileError(
            f"{path}: token id {max(by_id)} does not fit the model's vocab_size {n_vocab}")
    added = {int(a["id"]): a for a in tj.get("added_tokens") or []}
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # embedding rows past the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            if not added[i].get("normalized", False):
                # llama.cpp matches added tokens against already-normalized text
                text = tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False)
            if added[i].get("special") or looks_special(text):
                types.append(TokenType.CONTROL)
            else:
                text = text.replace(SPIECE_UNDERLINE, " ")
                types.append(TokenType.USER_DEFINED)
            tokens.append(text)
        else:
            tokens.append(text)
            types.append(TokenType.NORMAL)
    special = _special_vocab(folder, n_vocab, merges=True)
    if not special.merges:
        raise InvalidModelFileError(f"{path}: a BPE tokenizer without merges")
    add_bos, add_eos = _measured_add_flags(tok, special)
    add_bos, add_eos = _settle_add_flags(special, config, add_bos, add_eos)
    return VocabSpec(
        model="gpt2", pre=pre, tokens=tuple(tokens), token_types=tuple(types), scores=None,
        special=special, add_bos=add_bos, add_eos=add_eos, add_space_prefix=None,
    )


def _settle_add_flags(special: SpecialVocab, config: dict[str, Any], bos: bool, eos: bool) -> tuple[bool, bool]:
    """Decide add_bos/add_eos (an explicit tokenizer_config flag wins) and always record both.

    Both keys always go into the file: when one is absent llama.cpp falls back to a default
    that depends on the tokenizer kind (llama-bpe and SentencePiece assume BOS).
    """
    bos = config["add_bos_token"] if isinstance(config.get("add_bos_token"), bool) else bos
    eos = config["add_eos_token"] if isinstance(config.get("add_eos_token"), bool) else eos
    special.add_special_token["bos"], special.add_special_token["eos"] = bos, eos
    return bos, eos


def _measured_add_flags(tok: Any, special: SpecialVocab) -> tuple[bool, bool]:
    """Whether encoding adds BOS/EOS, seen by encoding a word (the post-processor decides)."""
    plain = tok.encode("hello", add_special_tokens=False).ids
    full = tok.encode("hello", add_special_tokens=True).ids
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def _sentencepiece_vocab(folder: Path, n_vocab: int, config: dict[str, Any]) -> VocabSpec:
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise UnsupportedModelError(
            f"{folder}: a SentencePiece tokenizer needs the sentencepiece package",
            "pip install 'edge-runtime[convert]'",
        ) from None
    path = folder / TOKENIZER_MODEL
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as exc:
        raise InvalidModelFileError(f"{path}: cannot be loaded ({exc})") from None
    if sp.vocab_size() > n_vocab:
        raise InvalidModelFileError(f"{path}: {sp.vocab_size()} pieces do not fit vocab_size {n_vocab}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [int(TokenType.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i], scores[i] = sp.IdToPiece(i), float(sp.GetScore(i))
        types[i] = (TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                    else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                    else TokenType.NORMAL)
    for text, i in (read_json_object(folder / "added_tokens.json") or {}).items():
        if isinstance(i, int) and 0 <= i < n_vocab:
            tokens[i], scores[i], types[i] = text, -1000.0, TokenType.USER_DEFINED
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        i, text = int(key), str(entry.get("content", ""))
        if not 0 <= i < n_vocab:
            continue
        if entry.get("special") or looks_special(text):
            types[i] = TokenType.CONTROL
        else:
            text, types[i] = text.replace(SPIECE_UNDERLINE, " "), TokenType.USER_DEFINED
        tokens[i], scores[i] = text, -1000.0
    special = _special_vocab(folder, n_vocab, merges=False)
    # LlamaTokenizer's defaults: BOS yes, EOS no
    add_bos, add_eos = _settle_add_flags(special, config, special.add_special_token.get("bos", True),
                                         special.add_special_token.get("eos", False))
    # Whether a "▁" is prepended (the model's add_dummy_prefix, false for Gemma): seen by encoding
    # a word, unless tokenizer_config says otherwise. Always written: llama.cpp assumes true.
    prefix = config.get("add_prefix_space")
    if not isinstance(prefix, bool):
        first = sp.EncodeAsPieces("a")
        prefix = bool(first) and first[0].startswith(SPIECE_UNDERLINE)
    return VocabSpec(
        model="llama", pre="default", tokens=tuple(tokens), token_types=tuple(int(t) for t in types),
        scores=tuple(scores), special=special, add_bos=add_bos, add_eos=add_eos, add_space_prefix=prefix,
    )
