"""A safe reader for GGUF headers: metadata, tensor table and sizes, without loading weights.

Model files are untrusted input. Every count, length and offset is checked against the file size
before it is read, so a hostile or damaged file fails with `InvalidModelFileError` (one line naming
the file and the problem) instead of hanging the process (gguf's `GGUFReader` on a 2^63-element
array) or aborting it (llama.cpp's asserts). Big arrays (the tokenizer's ~50k-260k strings) are
bounds-checked and skipped, not decoded, so a header walk takes milliseconds.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterable

from edge_runtime.errors import InvalidModelFileError, ModelNotFoundError

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

# GGUF value type number -> struct format of one element (strings and arrays handled apart).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_SCALAR_STRUCTS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_STRING, _ARRAY = 8, 9


@functools.lru_cache(maxsize=1)
def gguf_constants() -> ModuleType:
    """The `gguf.constants` module, loaded without the rest of the `gguf` package.

    `import gguf.constants` runs gguf/__init__.py, which pulls in numpy, yaml and the writer
    (~0.2-0.3 s); constants.py alone needs only the standard library (~30 ms).
    """
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("gguf")  # locates the package without executing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "constants.py")
        if os.path.isfile(candidate):
            file_spec = importlib.util.spec_from_file_location("edge_runtime._gguf_constants", candidate)
            if file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                return module
    import gguf.constants  # unusual layout (zipped, frozen): pay for the whole package

    return gguf.constants


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array: its element type, length, and its values when small (else None)."""

    type: int  # a gguf.constants.GGUFValueType member
    length: int
    values: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table; `shape` is in GGUF order (ne[0], the row length, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    n_elements: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file but the weights themselves."""

    path: str
    version: int
    file_size: int
    data_offset: int
    alignment: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]

    @property
    def architecture(self) -> str:
        """`general.architecture` ("llama", "gemma3", ...), or "" when absent."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else ""

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by its full key."""
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """The architecture-scoped value `{arch}.{suffix}` (e.g. "attention.head_count_kv")."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def tensor(self, name: str) -> GGUFTensor | None:
        """The tensor called `name`, or None."""
        for t in self.tensors:
            if t.name == name:
                return t
        return None

    @property
    def n_params(self) -> int:
        """Number of weights (elements of every tensor)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        """Bytes of tensor data, alignment padding excluded."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_vocab(self) -> int | None:
        """Vocabulary size from the tokenizer, `{arch}.vocab_size` or the embedding shape."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, GGUFArray):
            return tokens.length
        size = self.arch_key("vocab_size")
        if isinstance(size, int):
            return size
        embd = self.tensor("token_embd.weight")
        return embd.shape[-1] if embd is not None and len(embd.shape) >= 2 else None

    @property
    def file_type_name(self) -> str | None:
        """llama.cpp's name for the quantization ("Q4_1", "Q4_K_M"); guessed when unrecorded."""
        ftype = self.metadata.get("general.file_type")
        names = {int(m): m.name for m in gguf_constants().LlamaFileType}
        if isinstance(ftype, int) and ftype in names and names[ftype] != "GUESSED":
            name = names[ftype]
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
        # llama.cpp guesses the same way: the most common type among the matrices.
        counts: dict[str, int] = {}
        for t in self.tensors:
            if len(t.shape) >= 2:
                counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return max(counts, key=lambda k: counts[k]) if counts else None

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (`tokenizer.chat_template`), if any."""
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None


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


def describe_gguf(path: str | os.PathLike[str]) -> GGUFDescription:
    """Read a GGUF header and summarise it (name, arch, quant, size, context, layers, vocab)."""
    header = read_gguf_header(path)
    name = header.get("general.name")
    return GGUFDescription(
        name=name if isinstance(name, str) and name else os.path.splitext(os.path.basename(header.path))[0],
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


def read_gguf_header(path: str | os.PathLike[str], *, keep_arrays: Iterable[str] = ()) -> GGUFHeader:
    """Parse and validate a GGUF file's header, metadata and tensor table.

    Arrays longer than `SMALL_ARRAY_LEN` keep `values=None` unless their key is in `keep_arrays`.
    Raises `ModelNotFoundError` for a missing file and `InvalidModelFileError` for anything else.
    """
    shown = os.fspath(path)
    try:
        fd = os.open(shown, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{shown}: no such file", "check the path or run `edgert models list`") from None
    except IsADirectoryError:
        raise InvalidModelFileError(f"{shown}: is a directory, not a GGUF file") from None
    except OSError as exc:
        raise InvalidModelFileError(f"{shown}: cannot open: {exc.strerror or exc}") from None
    try:
        if not os.path.isfile(shown):  # O_RDONLY opens a directory on some systems
            raise InvalidModelFileError(f"{shown}: is a directory or device, not a GGUF file")
        size = os.fstat(fd).st_size
        if size == 0:
            raise InvalidModelFileError(f"{shown}: empty file (0 bytes), not a GGUF file")
        try:
            buf = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise InvalidModelFileError(f"{shown}: cannot map the file: {exc}") from None
        try:
            return _Parser(buf, size, shown, frozenset(keep_arrays)).parse()
        finally:
            buf.close()
    finally:
        os.close(fd)


class _Parser:
    """One pass over the mapped file; `pos` only moves forward after a bounds check."""

    def __init__(self, buf: mmap.mmap, size: int, shown: str, keep: frozenset[str]) -> None:
        self.buf, self.size, self.shown, self.keep = buf, size, shown, keep
        self.pos = 0
        self.c = gguf_constants()

    def fail(self, problem: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.shown}: {problem}")

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise self.fail(f"truncated: {what} needs bytes {self.pos}..{self.pos + n} but the file has {self.size}")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = _U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self.need(8, what)
        (v,) = _U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        if self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt: {what}: string of {n} bytes at byte {self.pos} but the file has {self.size}")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def parse(self) -> GGUFHeader:
        magic = self.buf[:4]
        if magic != GGUF_MAGIC:
            raise self.fail(f"not a GGUF file (magic {bytes(magic)!r})")
        if self.size < _HEADER_BYTES:
            raise self.fail(f"truncated: the GGUF header needs {_HEADER_BYTES} bytes but the file has {self.size}")
        self.pos = 4
        version = self.u32("the version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if swapped in SUPPORTED_VERSIONS:
                raise self.fail(f"big-endian GGUF (version {swapped}) is not supported; use a little-endian file")
            if version == 1:
                raise self.fail("GGUF version 1 is no longer supported (llama.cpp reads versions 2 and 3)")
            raise self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = self.u64("the tensor count")
        n_kv = self.u64("the metadata count")
        room = self.size - _HEADER_BYTES
        if n_tensors > room // _MIN_TENSOR_INFO_BYTES:
            raise self.fail(f"header declares {n_tensors} tensors but the file is {self.size} bytes")
        if n_kv > room // _MIN_KV_BYTES or n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > room:
            raise self.fail(f"header declares {n_kv} metadata entries but the file is {self.size} bytes")

        metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = self.string(f"metadata key #{i}")
            if not key:
                raise self.fail(f"metadata key #{i} is empty")
            if key in metadata:
                raise self.fail(f"duplicate metadata key {key!r}")
            metadata[key] = self.value(key)

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        is_int = isinstance(alignment, int) and not isinstance(alignment, bool)
        if not is_int or alignment <= 0 or alignment & (alignment - 1):
            raise self.fail(f"general.alignment must be a power of two, got {alignment!r}")

        tensors = [self.tensor_info(i) for i in range(n_tensors)]
        data_offset = self.pos if not tensors else -(-self.pos // alignment) * alignment
        placed = self.place_tensors(tensors, data_offset, alignment)
        return GGUFHeader(self.shown, version, self.size, data_offset, alignment, metadata, placed)

    def value(self, key: str) -> Any:
        vtype = self.u32(f"the value type of {key!r}")
        if vtype == _STRING:
            return self.string(f"metadata key {key!r}")
        if vtype == _ARRAY:
            return self.array(key)
        scalar = _SCALAR_STRUCTS.get(vtype)
        if scalar is None:
            raise self.fail(f"metadata key {key!r}: unknown value type {vtype}")
        self.need(scalar.size, f"the value of {key!r}")
        (v,) = scalar.unpack_from(self.buf, self.pos)
        self.pos += scalar.size
        return v

    def array(self, key: str) -> GGUFArray:
        etype = self.u32(f"the element type of {key!r}")
        n = self.u64(f"the length of {key!r}")
        if etype == _ARRAY:
            raise self.fail(f"metadata key {key!r}: arrays of arrays are not supported")
        value_type = self.c.GGUFValueType
        keep = n <= SMALL_ARRAY_LEN or key in self.keep
        if etype == _STRING:
            return GGUFArray(value_type(etype), n, self.string_array(key, n, keep))
        fmt = _SCALAR_FORMATS.get(etype)
        if fmt is None:
            raise self.fail(f"metadata key {key!r}: array of unknown value type {etype}")
        n_bytes = n * _SCALAR_STRUCTS[etype].size
        if self.pos + n_bytes > self.size:
            raise self.fail(
                f"truncated or corrupt: metadata key {key!r}: array of {n} {value_type(etype).name.lower()} values "
                f"({n_bytes} bytes)"
                f" at byte {self.pos} but the file has {self.size}"
            )
        values = struct.unpack_from(f"<{n}{fmt}", self.buf, self.pos) if keep else None
        self.pos += n_bytes
        return GGUFArray(value_type(etype), n, values)

    def string_array(self, key: str, n: int, keep: bool) -> tuple[str, ...] | None:
        if n * 8 > self.size - self.pos:  # every string has at least its 8-byte length
            raise self.fail(
                f"truncated or corrupt: metadata key {key!r}: array of {n} strings at byte {self.pos} "
                f"but the file has {self.size}"
            )
        if keep:
            return tuple(self.string(f"{key!r}[{i}]") for i in range(n))
        # The hot loop of a header walk (tokenizer vocabularies): check and skip, no decoding.
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        last = size - 8
        for i in range(n):
            if pos > last:
                raise self.fail(f"truncated: metadata key {key!r}: string {i} of {n} starts past the end of the file")
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise self.fail(f"truncated: metadata key {key!r}: strings end at byte {pos} but the file has {size}")
        self.pos = pos
        return None

    def tensor_info(self, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = self.string(f"the name of tensor #{i}")
        if len(name.encode("utf-8", errors="replace")) >= GGML_MAX_NAME:
            raise self.fail(f"tensor #{i}: name of {len(name)} characters is too long (llama.cpp allows 63 bytes)")
        n_dims = self.u32(f"the dimension count of tensor {name!r}")
        if n_dims > GGML_MAX_DIMS:
            raise self.fail(f"tensor {name!r}: {n_dims} dimensions (llama.cpp allows at most {GGML_MAX_DIMS})")
        self.need(8 * n_dims, f"the shape of tensor {name!r}")
        shape = struct.unpack_from(f"<{n_dims}q", self.buf, self.pos)
        self.pos += 8 * n_dims
        n_elements = 1
        for d, dim in enumerate(shape):
            if dim <= 0:
                raise self.fail(f"tensor {name!r}: dimension {d} is {dim} (must be positive)")
            n_elements *= dim
            if n_elements > _INT64_MAX:
                raise self.fail(f"tensor {name!r}: shape {list(shape)} overflows a 64-bit element count")
        self.need(4, f"the type of tensor {name!r}")
        (ggml_type,) = _I32.unpack_from(self.buf, self.pos)
        self.pos += 4
        offset = self.u64(f"the data offset of tensor {name!r}")
        return name, tuple(shape), ggml_type, offset

    def place_tensors(
        self, infos: list[tuple[str, tuple[int, ...], int, int]], data_offset: int, alignment: int
    ) -> tuple[GGUFTensor, ...]:
        quant_sizes = self.c.GGML_QUANT_SIZES
        qtype = self.c.GGMLQuantizationType
        known = {int(t): t for t in qtype}
        tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, shape, ggml_type, rel_offset in infos:
            if name in seen:
                raise self.fail(f"duplicate tensor name {name!r}")
            seen.add(name)
            member = known.get(ggml_type)
            if member is None or member not in quant_sizes:
                raise self.fail(f"tensor {name!r}: unknown ggml type {ggml_type}")
            block, type_size = quant_sizes[member]
            row = shape[0] if shape else 1
            if row % block:
                raise self.fail(f"tensor {name!r}: row of {row} values is not a multiple of {member.name}'s block size {block}")
            n_elements = 1
            for dim in shape:
                n_elements *= dim
            n_bytes = n_elements // block * type_size
            if rel_offset % alignment:
                raise self.fail(f"tensor {name!r}: data offset {rel_offset} is not a multiple of the alignment {alignment}")
            start = data_offset + rel_offset
            if start + n_bytes > self.size:
                raise self.fail(f"truncated: tensor {name!r} data ends at byte {start + n_bytes} but the file has {self.size}")
            tensors.append(GGUFTensor(name, shape, ggml_type, member.name, start, n_bytes, n_elements))
        by_start = sorted(tensors, key=lambda t: t.offset)
        for prev, cur in zip(by_start, by_start[1:]):
            if cur.offset < prev.offset + prev.n_bytes:
                raise self.fail(f"tensor {cur.name!r} data (from byte {cur.offset}) overlaps tensor {prev.name!r}")
        return tuple(tensors)
