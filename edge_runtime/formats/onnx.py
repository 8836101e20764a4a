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
from edge_runtime.formats.containment import check_no_escaping_links, inside_folder
from edge_runtime.formats.onnx_external import external_references

GENAI_CONFIG = "genai_config.json"
# Written by converters/to_onnx.py beside genai_config.json: what the folder itself cannot say.
SIDECAR = "edgert_onnx.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
MAX_JSON_BYTES = 64 << 20  # the largest tokenizer.json is ~30 MB


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
    check_no_escaping_links(folder)
    config = _read_json(folder / GENAI_CONFIG)
    _check_file_names(config, folder)
    try:
        model = config["model"]
        decoder = model["decoder"]
        decoder_file = folder / decoder["filename"]
        n_layer, n_kv = _count(decoder, "num_hidden_layers"), _count(decoder, "num_key_value_heads")
        head_size = _count(decoder, "head_size")
        search = config.get("search") or {}
        max_length = _count(search, "max_length") if search.get("max_length") else _count(model, "context_length")
        n_vocab = _count(model, "vocab_size")
        hidden_size = _count(decoder, "hidden_size") if decoder.get("hidden_size") else n_kv * head_size
        window = decoder.get("sliding_window") or {}
        sliding_window = _count(window, "window_size") if window.get("window_size") else 0
        provider_options = (decoder.get("session_options") or {}).get("provider_options") or []
        providers = tuple(str(name) for entry in provider_options for name in entry)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InvalidModelFileError(f"{folder / GENAI_CONFIG}: missing or malformed field {exc}",
                                    "convert the model again") from None
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
    eos_ids = tuple(e for e in (eos if isinstance(eos, list) else [eos]) if _is_int(e))
    bos = model.get("bos_token_id")
    kv_bytes, precision, n_params = sidecar.get("kv_bytes"), sidecar.get("precision"), sidecar.get("n_params")
    return OnnxFolder(
        path=folder, decoder_file=decoder_file, data_files=data_files, arch=str(model.get("type") or "unknown"),
        n_layer=n_layer, n_kv_heads=n_kv, head_size=head_size, n_vocab=n_vocab, hidden_size=hidden_size,
        max_length=max_length, sliding_window=sliding_window,
        bos_id=bos if _is_int(bos) else None, eos_ids=eos_ids, providers=providers,
        # The builder keeps the KV cache in the model's I/O type: float32 on CPU, float16 on GPUs.
        kv_bytes=kv_bytes if kv_bytes in (1, 2, 4) and _is_int(kv_bytes) else (2 if providers else 4),
        precision=precision if isinstance(precision, str) else _precision_from_name(folder.name),
        n_params=n_params if _is_int(n_params) else None,
        embedding_quantized=sidecar.get("embedding_quantized") is True,
        size_bytes=sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()),
        tokenizer_config=tok_config,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(section: dict[str, Any], key: str) -> int:
    """``section[key]`` as a count runtimes can hold (a positive int32), else ``ValueError``."""
    value = section[key]
    if not _is_int(value) or not 0 < value < 2**31:
        raise ValueError(f"{key}: expected a positive count, got {value!r}")
    return value


def _check_file_names(config: dict[str, Any], folder: Path) -> None:
    """Every ``*filename`` in genai_config.json names a file inside the folder (genai opens them)."""
    pending: list[Any] = [config]
    while pending:
        node = pending.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            if isinstance(key, str) and key.endswith("filename"):
                if not isinstance(value, str):
                    raise InvalidModelFileError(f"{folder / GENAI_CONFIG}: {key} is {value!r}, not a file name",
                                                "convert the model again")
                inside_folder(folder, value, f"{folder / GENAI_CONFIG}: {key}")
            else:
                pending.append(value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InvalidModelFileError(f"{path.parent}: no {path.name}",
                                    "give a folder written by `edgert convert --format onnx`")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ValueError(f"{path.stat().st_size} bytes, more than any config needs")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidModelFileError(f"{path}: not valid JSON ({exc})", "convert the model again") from None
    if not isinstance(data, dict):
        raise InvalidModelFileError(f"{path}: expected a JSON object", "convert the model again")
    return data


def _check_external_data(decoder_file: Path) -> tuple[Path, ...]:
    """The data files the graph's tensors point to, each inside the folder and long enough.

    Every reference in the graph is read (``onnx_external``), so no ONNX library is needed and no
    graph is too large to check: an absolute path, a ``..``, or a link leading out of the folder
    is refused, as is a file shorter than the bytes the graph asks of it.
    """
    folder = decoder_file.parent
    needed: dict[Path, int] = {}
    for ref in external_references(decoder_file):
        data = inside_folder(folder, ref.location, f"{decoder_file}: weights file")
        if not data.is_file():
            raise InvalidModelFileError(f"{folder}: the weights file {ref.location} is missing",
                                        "copy the whole folder, or convert the model again")
        needed[data] = max(needed.get(data, 0), ref.offset + (ref.length or 0))
    for data, end in needed.items():
        if data.stat().st_size < end:
            raise InvalidModelFileError(
                f"{data}: truncated ({data.stat().st_size} bytes, the graph needs {end})",
                "copy the whole folder again, or convert the model again")
    return tuple(sorted(needed))


def _precision_from_name(name: str) -> str | None:
    m = re.search(r"-(fp32|fp16|bf16|int8|int4)-onnx$", name)
    return m.group(1) if m else None


