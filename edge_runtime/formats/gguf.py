"""A safe reader for GGUF headers: metadata, tensor table and sizes, without loading weights.

Model files are untrusted input. Every count, length and offset is checked against the file size
before it is read, so a hostile or damaged file fails with `InvalidModelFileError` (one line naming
the file and the problem) instead of hanging the process (gguf's `GGUFReader` on a 2^63-element
array) or aborting it (llama.cpp's asserts). Big arrays (the tokenizer's ~50k-260k strings) are
bounds-checked and skipped, not decoded, so a header walk takes milliseconds.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidModelFileError, ModelNotFoundError
from edge_runtime.formats.gguf_header import GGUFArray, GGUFHeader, GGUFTensor, gguf_constants

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp's tensor name buffer, terminating NUL included
DEFAULT_ALIGNMENT = 32
# Arrays up to this length are decoded (per-layer hparams, SWA patterns); longer ones only skipped.
SMALL_ARRAY_LEN = 1024
_INT64_MAX = 2**63 - 1
# Smallest possible encodings, used to reject absurd counts before walking them.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-byte key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 4 + 8  # name length, 1-byte name, n_dims, type, offset
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, KV count

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")
_I64 = struct.Struct("<q")

# struct format of one element per GGUFValueType name (strings and arrays are handled apart).
_SCALAR_FORMATS = {"UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i",
                   "FLOAT32": "f", "BOOL": "?", "UINT64": "Q", "INT64": "q", "FLOAT64": "d"}


@functools.lru_cache(maxsize=1)
def _value_types() -> tuple[int, int, dict[int, struct.Struct]]:
    """(STRING, ARRAY, {scalar type: struct}) keyed by gguf's own GGUFValueType numbers."""
    types = gguf_constants().GGUFValueType
    scalars = {int(types[name]): struct.Struct("<" + fmt) for name, fmt in _SCALAR_FORMATS.items()}
    return int(types.STRING), int(types.ARRAY), scalars


@dataclass(frozen=True)
class GGUFDescription:
    """The summary `edgert models list` shows for one GGUF file."""

    name: str
    arch: str
    quant: str | None
    n_params: int
    size_bytes: int
    n_ctx_train: int | None
    n_layer: int | None
    n_vocab: int | None
    has_chat_template: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict."""
        return dict(self.__dict__)


def describe_gguf(path: str | os.PathLike[str], *, parts: Sequence[str] = ()) -> GGUFDescription:
    """Read a GGUF header and summarise it (name, arch, quant, size, context, layers, vocab)."""
    header = read_gguf_header(path, parts=parts)
    name = header.get("general.name")
    return GGUFDescription(
        name=name if isinstance(name, str) and name else Path(header.path).stem,
        arch=header.architecture,
        quant=header.file_type_name,
        n_params=header.n_params,
        size_bytes=header.file_size,
        n_ctx_train=_as_int(header.arch_key("context_length")),
        n_layer=_as_int(header.arch_key("block_count")),
        n_vocab=header.n_vocab,
        has_chat_template=header.chat_template is not None,
    )


def _as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_gguf_header(path: str | os.PathLike[str], *, keep_arrays: Iterable[str] = (),
                     parser: type[_Parser] | None = None, parts: Sequence[str] = ()) -> GGUFHeader:
    """Parse and validate a GGUF file's header, metadata and tensor table.

    Arrays longer than `SMALL_ARRAY_LEN` keep `values=None` unless their key is in `keep_arrays`;
    `parser` is a `_Parser` subclass that checks more as it walks (`deep_checks`). With `parts`
    (a file shipped in pieces, not yet joined at `path`) the header is read from the first piece
    and checked against the pieces' total size.
    Raises `ModelNotFoundError` for a missing file and `InvalidModelFileError` for anything else.
    """
    shown = os.fspath(path)
    if parts:
        return _read_from_parts(shown, parts, frozenset(keep_arrays), parser or _Parser)
    try:
        mode = os.stat(shown).st_mode
    except FileNotFoundError:
        hint = "check the path or run `edgert models list`"
        raise ModelNotFoundError(f"{shown}: no such file", hint) from None
    except OSError as exc:
        raise InvalidModelFileError(f"{shown}: cannot read: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        raise InvalidModelFileError(f"{shown}: is a directory, not a GGUF file")
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise InvalidModelFileError(f"{shown}: not a regular file")
    try:
        with open(shown, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise InvalidModelFileError(f"{shown}: empty file (0 bytes), not a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return (parser or _Parser)(buf, shown, frozenset(keep_arrays)).parse()
    except (OSError, ValueError) as exc:
        raise InvalidModelFileError(f"{shown}: cannot read: {exc}") from None


def _read_from_parts(shown: str, parts: Sequence[str], keep: frozenset[str], parser: type[_Parser]) -> GGUFHeader:
    try:
        total = sum(os.stat(p).st_size for p in parts)
        with open(parts[0], "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return parser(buf, shown, keep, size=total).parse()
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"{shown}: a part is missing: {exc.filename}", "reinstall its package") from None
    except (OSError, ValueError, struct.error) as exc:  # struct.error: the header runs past the first part
        raise InvalidModelFileError(f"{shown}: cannot read its header from its parts: {exc}") from None


class _Parser:
    """One pass over the mapped file; every read is checked against the file size first."""

    def __init__(self, buf: mmap.mmap, shown: str, keep: frozenset[str], *, size: int | None = None) -> None:
        self.buf, self.size, self.shown, self.keep = buf, len(buf) if size is None else size, shown, keep
        self.pos = 0
        self.c = gguf_constants()
        self.t_string, self.t_array, self.scalars = _value_types()

    def fail(self, problem: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.shown}: {problem}")

    def past_end(self, what: str, end: int) -> InvalidModelFileError:
        return self.fail(f"truncated: {what} ends at byte {end} but the file has {self.size}")

    def take(self, fmt: struct.Struct, what: str) -> Any:
        if self.pos + fmt.size > self.size:
            raise self.past_end(what, self.pos + fmt.size)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def string(self, what: str) -> str:
        n = self.take(_U64, f"the length of {what}")
        if self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt: {what}: string of {n} bytes at byte {self.pos} "
                            f"but the file has {self.size}")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def name(self, what: str) -> str:
        """A key or tensor name: short printable text, so an error may quote it (never raw bytes)."""
        text = self.string(what)
        if len(text) > 256 or not text.isprintable():
            raise self.fail(f"{what} is not a name (over 256 characters or not printable text)")
        return text

    def parse(self) -> GGUFHeader:
        magic = self.buf[:4]
        if magic != GGUF_MAGIC:
            raise self.fail("not a GGUF file (it does not start with the GGUF magic)")
        if self.size < _HEADER_BYTES:
            raise self.past_end("the GGUF header", _HEADER_BYTES)
        self.pos = 4
        version = self.take(_U32, "the version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise self.fail(f"big-endian GGUF (version {swapped}) is not supported; "
                                "use a little-endian file")
            if version == 1:
                raise self.fail("GGUF version 1 is no longer supported (llama.cpp reads versions 2 and 3)")
            raise self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = self.take(_U64, "the tensor count")
        n_kv = self.take(_U64, "the metadata count")
        room = self.size - _HEADER_BYTES
        if n_tensors > room // _MIN_TENSOR_INFO_BYTES:
            raise self.fail(f"header declares {n_tensors} tensors but the file is {self.size} bytes")
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > room:
            raise self.fail(f"header declares {n_kv} metadata entries but the file is {self.size} bytes")

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self.name(f"metadata key #{i}")
            if not key:
                raise self.fail(f"metadata key #{i} is empty")
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}")
            metadata[key] = self.value(key)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment must be a power of two, got {alignment!r}")

        seen: set[str] = set()
        infos = [self.tensor_info(i, seen) for i in range(n_tensors)]
        data_offset = -(-self.pos // alignment) * alignment if infos else self.pos
        tensors = self.place(infos, data_offset, alignment)
        return GGUFHeader(self.shown, version, self.size, data_offset, alignment, metadata, tensors)

    def value(self, key: str) -> Any:
        vtype = self.take(_U32, f"the value type of {key!r}")
        if vtype == self.t_string:
            return self.string(f"metadata key {key!r}")
        if vtype == self.t_array:
            return self.array(key)
        if vtype not in self.scalars:
            raise self.fail(f"metadata key {key!r}: unknown value type {vtype}")
        return self.take(self.scalars[vtype], f"the value of {key!r}")

    def array(self, key: str) -> GGUFArray:
        etype = self.take(_U32, f"the element type of {key!r}")
        n = self.take(_U64, f"the length of {key!r}")
        if etype == self.t_array:  # llama.cpp rejects them too
            raise self.fail(f"metadata key {key!r}: arrays of arrays are not supported")
        if etype != self.t_string and etype not in self.scalars:
            raise self.fail(f"metadata key {key!r}: array of unknown value type {etype}")
        value_type = self.c.GGUFValueType(etype)
        keep = n <= SMALL_ARRAY_LEN or key in self.keep
        # every element takes at least 8 bytes (a string's length) or its scalar size
        n_bytes = n * (8 if etype == self.t_string else self.scalars[etype].size)
        if self.pos + n_bytes > self.size:
            raise self.fail(f"truncated or corrupt: metadata key {key!r}: array of {n} "
                            f"{value_type.name.lower()} values at byte {self.pos} "
                            f"but the file has {self.size}")
        if etype == self.t_string:
            return GGUFArray(value_type, n, self.string_array(key, n, keep))
        fmt = self.scalars[etype].format[-1]
        values = struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos) if keep else None
        self.pos += n_bytes
        return GGUFArray(value_type, n, values)

    def string_array(self, key: str, n: int, keep: bool) -> tuple[str, ...] | None:
        if keep:
            return tuple(self.string(f"{key!r}[{i}]") for i in range(n))
        # The hot loop of a header walk (tokenizer vocabularies): check and skip, no decoding.
        buf, pos, last, unpack = self.buf, self.pos, self.size - 8, _U64.unpack_from
        for i in range(n):
            if pos > last:
                raise self.past_end(f"metadata key {key!r}: string {i} of {n}", pos + 8)
            pos += 8 + unpack(buf, pos)[0]
        if pos > self.size:
            raise self.past_end(f"metadata key {key!r}", pos)
        self.pos = pos
        return None

    def tensor_info(self, i: int, seen: set[str]) -> tuple[str, tuple[int, ...], Any, int, int, int]:
        name = self.name(f"the name of tensor #{i}")
        if len(name.encode("utf-8", errors="replace")) >= GGML_MAX_NAME:
            raise self.fail(f"tensor #{i}: a name of {len(name)} characters is too long "
                            f"(llama.cpp allows {GGML_MAX_NAME - 1} bytes)")
        if name in seen:
            raise self.fail(f"duplicate tensor name {name!r}")
        seen.add(name)
        n_dims = self.take(_U32, f"the dimension count of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise self.fail(f"tensor {name!r}: {n_dims} dimensions "
                            f"(llama.cpp allows at most {GGML_MAX_DIMS})")
        shape = tuple(self.take(_I64, f"the shape of tensor {name!r}") for _ in range(n_dims))
        n_elements = 1
        for d, dim in enumerate(shape):
            if dim <= 0:
                raise self.fail(f"tensor {name!r}: dimension {d} is {dim} (must be positive)")
            n_elements *= dim
            if n_elements > _INT64_MAX:
                raise self.fail(f"tensor {name!r}: shape {list(shape)} overflows a 64-bit element count")
        ggml_type = self.take(_I32, f"the type of tensor {name!r}")
        member = self.c.GGMLQuantizationType._value2member_map_.get(ggml_type)
        if member is None or member not in self.c.GGML_QUANT_SIZES:
            raise self.fail(f"tensor {name!r}: unknown ggml type {ggml_type}")
        block, type_size = self.c.GGML_QUANT_SIZES[member]
        if (shape[0] if shape else 1) % block:
            raise self.fail(f"tensor {name!r}: rows of {shape[0]} values are not a multiple of "
                            f"{member.name}'s block size {block}")
        offset = self.take(_U64, f"the data offset of tensor {name!r}")
        return name, shape, member, offset, n_elements // block * type_size, n_elements

    def place(self, infos: list[tuple[str, tuple[int, ...], Any, int, int, int]], data_offset: int,
              alignment: int) -> tuple[GGUFTensor, ...]:
        tensors = []
        for name, shape, member, rel_offset, n_bytes, n_elements in infos:
            if rel_offset % alignment:
                raise self.fail(f"tensor {name!r}: data offset {rel_offset} is not a multiple of "
                                f"the alignment {alignment}")
            start = data_offset + rel_offset
            if start + n_bytes > self.size:
                raise self.past_end(f"tensor {name!r} data", start + n_bytes)
            tensors.append(GGUFTensor(name, shape, int(member), member.name, start, n_bytes, n_elements))
        by_start = sorted(tensors, key=lambda t: t.offset)
        for prev, cur in itertools.pairwise(by_start):
            if cur.offset < prev.offset + prev.n_bytes:
                raise self.fail(f"tensor {cur.name!r} data (from byte {cur.offset}) "
                                f"overlaps tensor {prev.name!r}")
        return tuple(tensors)
