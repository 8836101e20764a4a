"""The layout of the .tflite files our converter writes, and a cheap reader for it.

Names shared by ``converters/to_tflite.py`` (which writes them, through litert-torch) and
``backends/tflite.py`` (which runs them): signatures ``prefill_<N>`` (N tokens at a time) and
``decode`` (one token), each taking ``tokens`` [1, N] int32, ``input_pos`` [N] int32 and the KV
cache as ``kv_cache_k_<layer>`` / ``kv_cache_v_<layer>`` [1, kv_len, kv_heads, head_dim], and
returning ``logits`` [1, N, vocab] and the updated cache under the same names.

``read_tflite_layout`` reads that from the FlatBuffer itself (signatures, tensor shapes, buffer
sizes, the ``min_runtime_version`` metadata) with bounds-checked reads over a memory map, so a
truncated or foreign file is a one-line ``InvalidModelFileError`` before any interpreter sees it,
and the planner learns the context (the KV length) without importing a runtime.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidModelFileError, ModelNotFoundError
from edge_runtime.formats.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

PREFILL_PREFIX = "prefill_"
DECODE = "decode"
TOKENS = "tokens"
INPUT_POS = "input_pos"
LOGITS = "logits"
KV_K = "kv_cache_k_{layer}"
KV_V = "kv_cache_v_{layer}"
MAX_RANK = 8  # dimensions a tensor may have (TFLite's kernels take at most 6)
_KV_NAME = re.compile(r"^kv_cache_([kv])_(\d+)$")

# Files written beside every .tflite: the tokenizer (TOKENIZER_FILE, ``tokenizers`` format), its
# config with the chat template and special tokens (TOKENIZER_CONFIG_FILE), and our own
# description of the artifact (``<file>.json``).
SIDECAR_SUFFIX = ".json"
__all__ = [
    "DECODE",
    "INPUT_POS",
    "KV_K",
    "KV_V",
    "LOGITS",
    "PREFILL_PREFIX",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "TOKENS",
    "parse_version",
    "read_tflite_layout",
    "runtime_too_old",
    "sidecar_path",
]
FILE_IDENTIFIER = b"TFL3"

# TFLite TensorType -> bytes per element (INT4 packs two values per byte: counted as 1 here,
# only ever used for the KV cache, which is float).
_TYPE_BYTES = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8, 16: 2, 17: 1, 18: 2}
_TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 9: "int8", 17: "int4", 18: "bfloat16"}


def sidecar_path(model_path: str | Path) -> Path:
    """Where the converter's description of ``model_path`` lives (``X.tflite.json``)."""
    p = Path(model_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def read_description(model_path: str | Path) -> dict[str, Any]:
    """The converter's ``<file>.json`` beside the model, or {} for a .tflite from elsewhere (or an
    unreadable one: a description is a convenience; the model file itself decides what runs)."""
    side = sidecar_path(model_path)
    if not side.is_file():
        return {}
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass(frozen=True)
class TensorInfo:
    """One signature input or output as the file declares it."""

    name: str
    shape: tuple[int, ...]
    type_id: int

    @property
    def dtype(self) -> str:
        return _TYPE_NAMES.get(self.type_id, f"type{self.type_id}")

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= max(d, 1)
        return n * _TYPE_BYTES.get(self.type_id, 4)


@dataclass(frozen=True)
class Signature:
    """One exported function of the model: its key, subgraph and named tensors."""

    key: str
    subgraph: int
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]


@dataclass(frozen=True)
class TfliteLayout:
    """What a decoder .tflite holds, read without an interpreter."""

    path: Path
    size_bytes: int
    signatures: dict[str, Signature]
    prefill_lengths: tuple[int, ...]  # ascending
    kv_len: int  # positions the exported cache holds: the model's context
    n_layer: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    kv_bytes: int  # one full cache (every layer's K and V)
    n_vocab: int
    weights_bytes: int  # constant buffers (weights, tables) in the file
    min_runtime_version: str | None


def read_tflite_layout(path: str | Path) -> TfliteLayout:
    """Check a .tflite file and describe its decoder signatures; bad files raise one-line errors."""
    with mapped_tflite(path) as model:
        return _describe(Path(path), model)


@contextlib.contextmanager
def mapped_tflite(path: str | Path) -> Iterator[_FlatModel]:
    """The file mapped for reading as a FlatBuffer model; a missing, short or unreadable file is one line."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            size = p.stat().st_size
            if size < 8:
                raise InvalidModelFileError(f"{p.name}: too short to be a TFLite model ({size} bytes)")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                yield _FlatModel(p.name, view, size)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise InvalidModelFileError(f"{p}: is a folder, not a .tflite file") from None
    except OSError as exc:
        raise InvalidModelFileError(f"{p}: cannot be read ({exc.strerror or exc})") from None


def _describe(path: Path, fm: _FlatModel) -> TfliteLayout:
    signatures = fm.signatures()
    if DECODE not in signatures:
        raise InvalidModelFileError(
            f"{path.name}: no '{DECODE}' signature; not a decoder exported by `edgert convert`",
            "convert the model with `edgert convert SRC --format tflite`",
        )
    prefill = sorted(int(k[len(PREFILL_PREFIX):]) for k in signatures
                     if k.startswith(PREFILL_PREFIX) and k[len(PREFILL_PREFIX):].isdigit())
    decode = signatures[DECODE]
    kv = {n: t for n, t in decode.inputs.items() if _KV_NAME.match(n)}
    first = kv.get(KV_K.format(layer=0)) or next(iter(kv.values()), None)
    logits = decode.outputs.get(LOGITS)
    if (first is None or logits is None or len(first.shape) != 4 or not logits.shape
            or min(first.shape) < 1 or min(logits.shape) < 1):
        raise InvalidModelFileError(f"{path.name}: unexpected KV cache shape {first and first.shape} or logits "
                                    f"shape {logits and logits.shape}")
    for key in [DECODE, *(f"{PREFILL_PREFIX}{n}" for n in prefill)]:  # each one the backend runs
        sig = signatures[key]
        if not kv or any(n not in sig.inputs for n in (TOKENS, INPUT_POS, *kv)) or LOGITS not in sig.outputs:
            raise InvalidModelFileError(f"{path.name}: the {key} signature lacks tokens, input_pos, "
                                        "KV cache inputs or logits; not a decoder this runtime can drive")
        rows = 1 if key == DECODE else int(key[len(PREFILL_PREFIX):])
        for name, shapes in ((TOKENS, ((1, rows),)), (INPUT_POS, ((rows,), (1, rows)))):
            # the runtime writes `rows` int32 ids and positions into them
            if sig.inputs[name].dtype != "int32":
                raise InvalidModelFileError(f"{path.name}: the {key} signature's {name} is "
                                            f"{sig.inputs[name].dtype}, not int32", "convert the model again")
            if sig.inputs[name].shape not in shapes:
                raise InvalidModelFileError(f"{path.name}: the {key} signature's {name} has shape "
                                            f"{list(sig.inputs[name].shape)}, not {list(shapes[0])}",
                                            "convert the model again")
        caches = [*(sig.inputs[n] for n in kv), *(t for n, t in sig.outputs.items() if _KV_NAME.match(n))]
        odd = next((t for t in caches if (t.shape, t.dtype) != (first.shape, first.dtype)), None)
        if odd is not None:  # a cache of another shape: LiteRT's kernels divide by its heads (SIGFPE)
            raise InvalidModelFileError(f"{path.name}: the {key} signature's {odd.name} is {odd.dtype} "
                                        f"{list(odd.shape)}, unlike {first.dtype} {list(first.shape)}",
                                        "convert the model again")
    _, kv_len, kv_heads, head_dim = first.shape
    return TfliteLayout(
        path=path, size_bytes=fm.size, signatures=signatures, prefill_lengths=tuple(prefill),
        kv_len=kv_len, n_layer=len(kv) // 2, kv_heads=kv_heads, head_dim=head_dim,
        kv_dtype=first.dtype, kv_bytes=sum(t.nbytes for t in kv.values()),
        n_vocab=decode.outputs[LOGITS].shape[-1], weights_bytes=fm.buffers_bytes(),
        min_runtime_version=fm.metadata_string("min_runtime_version"),
    )


class _FlatModel:
    """Bounds-checked reads of the few TFLite ``Model`` fields we need (schema.fbs field order)."""

    # Field numbers in schema.fbs (vtable slot = 4 + 2 * field).
    MODEL_SUBGRAPHS, MODEL_BUFFERS, MODEL_METADATA, MODEL_SIGNATURES = 2, 4, 6, 7
    SIG_INPUTS, SIG_OUTPUTS, SIG_KEY, SIG_SUBGRAPH = 0, 1, 2, 4
    MAP_NAME, MAP_INDEX = 0, 1
    SUBGRAPH_TENSORS = 0
    TENSOR_SHAPE, TENSOR_TYPE = 0, 1
    BUFFER_DATA, BUFFER_OFFSET, BUFFER_SIZE = 0, 1, 2
    META_NAME, META_BUFFER = 0, 1

    def __init__(self, name: str, view: mmap.mmap, size: int) -> None:
        self.name, self.view, self.size = name, view, size
        if view[4:8] != FILE_IDENTIFIER:
            raise InvalidModelFileError(f"{name}: not a TFLite model (no 'TFL3' identifier)",
                                        "give a .tflite file written by `edgert convert`")
        self.root = self._u32(0)
        self._check(self.root, 4)

    # -- primitive reads -------------------------------------------------------------------

    def _bad(self, why: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.name}: truncated or damaged TFLite file ({why})",
                                     "convert the model again, or copy the whole file")

    def _check(self, pos: int, n: int) -> None:
        if pos < 0 or pos + n > self.size:
            raise self._bad(f"offset {pos}+{n} beyond the file's {self.size} bytes")

    def _u32(self, pos: int) -> int:
        self._check(pos, 4)
        return struct.unpack_from("<I", self.view, pos)[0]

    def _field(self, table: int, field: int) -> int:
        """Absolute position of a table's field, or 0 when absent."""
        self._check(table, 4)
        vtable = table - struct.unpack_from("<i", self.view, table)[0]
        self._check(vtable, 4)
        vsize = struct.unpack_from("<H", self.view, vtable)[0]
        slot = 4 + 2 * field
        if slot + 2 > vsize:
            return 0
        self._check(vtable + slot, 2)
        off = struct.unpack_from("<H", self.view, vtable + slot)[0]
        return table + off if off else 0

    def _ref(self, table: int, field: int) -> int:
        """The table, vector or string a reference field points to, or 0."""
        pos = self._field(table, field)
        return pos + self._u32(pos) if pos else 0

    def _scalar(self, table: int, field: int, fmt: str, default: int = 0) -> int:
        pos = self._field(table, field)
        if not pos:
            return default
        self._check(pos, struct.calcsize(fmt))
        return struct.unpack_from("<" + fmt, self.view, pos)[0]

    def _vector(self, vec: int, elem: int = 4) -> tuple[int, int]:
        """(first element position, length) of a vector; checks it lies inside the file."""
        if not vec:
            return 0, 0
        n = self._u32(vec)
        self._check(vec + 4, n * elem)
        return vec + 4, n

    def _tables(self, table: int, field: int) -> list[int]:
        start, n = self._vector(self._ref(table, field))
        return [start + 4 * i + self._u32(start + 4 * i) for i in range(n)]

    def _string(self, table: int, field: int) -> str:
        start, n = self._vector(self._ref(table, field), 1)
        return bytes(self.view[start:start + n]).decode("utf-8", errors="replace") if start else ""

    # -- the model -------------------------------------------------------------------------

    def signatures(self) -> dict[str, Signature]:
        subgraphs = self._tables(self.root, self.MODEL_SUBGRAPHS)
        out: dict[str, Signature] = {}
        for sig in self._tables(self.root, self.MODEL_SIGNATURES):
            index = self._scalar(sig, self.SIG_SUBGRAPH, "I")
            if index >= len(subgraphs):
                raise self._bad(f"signature refers to subgraph {index} of {len(subgraphs)}")
            tensors = self._tables(subgraphs[index], self.SUBGRAPH_TENSORS)
            key = self._string(sig, self.SIG_KEY)
            out[key] = Signature(key, index, self._tensor_map(sig, self.SIG_INPUTS, tensors),
                                 self._tensor_map(sig, self.SIG_OUTPUTS, tensors))
        return out

    def _tensor_map(self, sig: int, field: int, tensors: list[int]) -> dict[str, TensorInfo]:
        found = {}
        for entry in self._tables(sig, field):
            name = self._string(entry, self.MAP_NAME)
            index = self._scalar(entry, self.MAP_INDEX, "I")
            if index >= len(tensors):
                raise self._bad(f"tensor {index} of {len(tensors)}")
            tensor = tensors[index]
            start, n = self._vector(self._ref(tensor, self.TENSOR_SHAPE))
            if n > MAX_RANK:  # a flipped length bit: millions of "dimensions" that LiteRT walks for minutes
                raise self._bad(f"tensor {name!r} has {n} dimensions (at most {MAX_RANK})")
            shape = struct.unpack_from(f"<{n}i", self.view, start) if n else ()
            found[name] = TensorInfo(name, tuple(shape), self._scalar(tensor, self.TENSOR_TYPE, "b"))
        return found

    def buffers_bytes(self) -> int:
        """Bytes of every buffer; also proves each lies inside the file (catches truncation)."""
        total = 0
        for buf in self._tables(self.root, self.MODEL_BUFFERS):
            _, n = self._vector(self._ref(buf, self.BUFFER_DATA), 1)
            offset = self._scalar(buf, self.BUFFER_OFFSET, "Q")
            size = self._scalar(buf, self.BUFFER_SIZE, "Q")
            if offset > 1:  # data kept outside the FlatBuffer (models over 2 GB)
                self._check(offset, size)
                n = size
            total += n
        return total

    def metadata_string(self, name: str) -> str | None:
        buffers = self._tables(self.root, self.MODEL_BUFFERS)
        for meta in self._tables(self.root, self.MODEL_METADATA):
            if self._string(meta, self.META_NAME) != name:
                continue
            index = self._scalar(meta, self.META_BUFFER, "I")
            if index >= len(buffers):
                raise self._bad(f"metadata buffer {index} of {len(buffers)}")
            start, n = self._vector(self._ref(buffers[index], self.BUFFER_DATA), 1)
            return bytes(self.view[start:start + n]).split(b"\0", 1)[0].decode("ascii", errors="replace")
        return None


def parse_version(text: str) -> tuple[int, ...]:
    """``"2.17.0"`` → (2, 17, 0); suffixes (``rc1``, ``.dev``, NUL padding) are ignored."""
    parts = []
    for piece in text.strip().strip("\0").split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def runtime_too_old(runtime_version: str, min_runtime_version: str | None) -> bool:
    """Whether a TFLite runtime of ``runtime_version`` predates what the model asks for."""
    if not min_runtime_version:
        return False
    need = parse_version(min_runtime_version)
    have = parse_version(runtime_version)
    width = max(len(need), len(have))
    return have + (0,) * (width - len(have)) < need + (0,) * (width - len(need))
