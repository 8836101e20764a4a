"""ONNX folders as onnxruntime-genai's model builder writes them, read and checked without a runtime.

An ONNX artifact is a folder: ``genai_config.json``, the decoder graph (``model.onnx``), its
external weights (``model.onnx.data``) and the tokenizer files. ``read_onnx_folder`` checks all of
that cheaply before onnxruntime sees it (external data references against the data files' sizes
included), so a damaged folder is a one-line error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidModelFileError

GENAI_CONFIG = "genai_config.json"
# Written by converters/to_onnx.py beside genai_config.json: what the folder itself cannot say.
SIDECAR = "edgert_onnx.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MiB = 1 << 20
# StringStringEntryProto entries of an initializer's external_data: key (field 1), value (field 2).
_EXTERNAL_ENTRY = re.compile(rb"\x0a(\x08location|\x06offset|\x06length)\x12")


@dataclass(frozen=True)
class OnnxFolder:
    """What an ONNX folder holds, read without loading the model."""

    path: Path
    decoder_file: Path
    data_files: tuple[Path, ...]
    arch: str
    n_layer: int
    n_kv_heads: int
    head_size: int
    n_vocab: int
    hidden_size: int
    max_length: int  # the longest sequence the config allows (the model's context)
    sliding_window: int  # window of the sliding-window layers (Gemma 3), 0 without them
    bos_id: int | None
    eos_ids: tuple[int, ...]
    providers: tuple[str, ...]  # execution providers the model was built for ("cuda", ...)
    kv_bytes: int  # bytes per cached key or value element
    precision: str | None
    n_params: int | None
    embedding_quantized: bool  # the embedding is the LM head's quantized weights (GatherBlockQuantized)
    size_bytes: int
    tokenizer_config: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def weights_bytes(self) -> int:
        return self.decoder_file.stat().st_size + sum(f.stat().st_size for f in self.data_files)

    def cache_positions(self, n_ctx: int) -> int:
        """Positions a generator's KV cache holds for a context of ``n_ctx``: genai refuses one
        smaller than the sliding window of a model that has one."""
        return max(n_ctx, min(self.sliding_window, self.max_length))

    def kv_cache_bytes(self, n_ctx: int) -> int:
        """K and V of every layer for ``n_ctx`` positions (genai allocates them all up front)."""
        return self.n_layer * self.n_kv_heads * self.head_size * 2 * self.cache_positions(n_ctx) * self.kv_bytes


def read_onnx_folder(path: str | Path) -> OnnxFolder:
    """Check an ONNX folder (config, decoder, external data, tokenizer) and describe it."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InvalidModelFileError(f"{folder}: not an ONNX model folder",
                                    "give the folder `edgert convert --format onnx` wrote")
    config = _read_json(folder / GENAI_CONFIG)
    try:
        model = config["model"]
        decoder = model["decoder"]
        decoder_file = folder / decoder["filename"]
        n_layer, n_kv = int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"])
        head_size = int(decoder["head_size"])
        max_length = int(config.get("search", {}).get("max_length") or model["context_length"])
        n_vocab = int(model["vocab_size"])
        hidden_size = int(decoder.get("hidden_size") or n_kv * head_size)
        sliding_window = int((decoder.get("sliding_window") or {}).get("window_size") or 0)
        provider_options = decoder.get("session_options", {}).get("provider_options", [])
        providers = tuple(name for entry in provider_options for name in entry)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModelFileError(f"{folder / GENAI_CONFIG}: missing or malformed field {exc}",
                                    "convert the model again") from None
    if Path(decoder["filename"]).name != decoder["filename"]:  # files stay inside the folder
        raise InvalidModelFileError(
            f"{folder / GENAI_CONFIG}: decoder file {decoder['filename']!r} is outside the folder")
    if not decoder_file.is_file() or decoder_file.stat().st_size == 0:
        raise InvalidModelFileError(f"{folder}: the decoder {decoder_file.name} is missing or empty",
                                    "convert the model again")
    data_files = _check_external_data(decoder_file)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise InvalidModelFileError(f"{folder}: no tokenizer (tokenizer.json or tokenizer.model)",
                                    "convert the model again")
    sidecar = _read_json(folder / SIDECAR) if (folder / SIDECAR).is_file() else {}
    tok_config = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    eos = model.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    bos = model.get("bos_token_id")
    return OnnxFolder(
        path=folder, decoder_file=decoder_file, data_files=data_files, arch=str(model.get("type") or "unknown"),
        n_layer=n_layer, n_kv_heads=n_kv, head_size=head_size, n_vocab=n_vocab, hidden_size=hidden_size,
        max_length=max_length, sliding_window=sliding_window,
        bos_id=bos if isinstance(bos, int) else None, eos_ids=eos_ids, providers=providers,
        # The builder keeps the KV cache in the model's I/O type: float32 on CPU, float16 on GPUs.
        kv_bytes=int(sidecar.get("kv_bytes") or (2 if providers else 4)),
        precision=sidecar.get("precision") or _precision_from_name(folder.name),
        n_params=sidecar.get("n_params"), embedding_quantized=bool(sidecar.get("embedding_quantized")),
        size_bytes=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        tokenizer_config=tok_config,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidModelFileError(f"{path.parent}: no {path.name}",
                                    "give a folder written by `edgert convert --format onnx`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InvalidModelFileError(f"{path}: not valid JSON ({exc})", "convert the model again") from None
    if not isinstance(data, dict):
        raise InvalidModelFileError(f"{path}: expected a JSON object", "convert the model again")
    return data


def _check_external_data(decoder_file: Path) -> tuple[Path, ...]:
    """The data files the graph's initializers point to, each checked to hold what they need.

    The references are found by scanning the graph's protobuf for its external-data entries
    (location, offset, length), so no ONNX library is needed; a graph too large to scan
    cheaply is left to onnxruntime.
    """
    if decoder_file.stat().st_size > 256 * MiB:
        return ()
    blob = decoder_file.read_bytes()
    needed: dict[str, int] = {}
    location, offset, length = None, 0, 0
    for match in _EXTERNAL_ENTRY.finditer(blob):
        start = match.end()
        size = blob[start]  # short strings: a one-byte varint
        value = blob[start + 1:start + 1 + size].decode("utf-8", errors="replace")
        key = match.group(1)[1:]
        if key == b"location":
            location, offset, length = value, 0, 0
        elif key == b"offset" and value.isdigit():
            offset = int(value)
        elif key == b"length" and value.isdigit():
            length = int(value)
        if location is not None:
            needed[location] = max(needed.get(location, 0), offset + length)
    files = []
    for name, end in sorted(needed.items()):
        if Path(name).name != name:
            raise InvalidModelFileError(f"{decoder_file}: weights file {name!r} is outside the folder")
        data = decoder_file.parent / name
        if not data.is_file():
            raise InvalidModelFileError(f"{decoder_file.parent}: the weights file {name} is missing",
                                        "copy the whole folder, or convert the model again")
        if data.stat().st_size < end:
            raise InvalidModelFileError(
                f"{data}: truncated ({data.stat().st_size} bytes, the graph needs {end})",
                "copy the whole folder again, or convert the model again")
        files.append(data)
    return tuple(files)


def _precision_from_name(name: str) -> str | None:
    m = re.search(r"-(fp32|fp16|bf16|int8|int4)-onnx$", name)
    return m.group(1) if m else None


