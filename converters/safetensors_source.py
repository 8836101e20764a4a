"""Reading a Hugging Face checkpoint's safetensors shards one tensor (or row slab) at a time.

The safetensors layout is simple enough to read without the ``safetensors`` package: an 8-byte
little-endian header length, a JSON header naming each tensor's dtype, shape and byte range, then
the raw data. Reading it ourselves gives three things the package does not: bf16 without torch
(numpy has no bfloat16), every offset checked against the file size before anything is written,
and reads into fresh buffers (``np.fromfile``) instead of a memory map, so finished tensors leave
the process's resident memory instead of staying mapped until the end of the conversion.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.errors import InvalidModelFileError, ModelNotFoundError, UnsupportedModelError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# A header is a few hundred bytes per tensor; anything near this is a damaged or foreign file.
MAX_HEADER_BYTES = 100 * 1024 * 1024
# Rows are converted in slabs of about this many bytes, so temporaries stay small.
SLAB_BYTES = 16 * 1024 * 1024

# safetensors dtype name -> (numpy dtype holding the raw bits, bytes per element)
DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 by shifting
    "F64": np.dtype("<f8"),
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes are: shard, dtype, shape and absolute byte range."""

    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def find_shards(folder: Path) -> list[Path]:
    """The shard files of a checkpoint folder, checked against the index when there is one."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidModelFileError(
                f"{index}: not a valid safetensors index ({exc})",
                "re-download the model or save it again with save_pretrained",
            ) from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise InvalidModelFileError(
                f"{folder}: {INDEX_NAME} names {len(missing)} missing shard(s): {', '.join(missing)}",
                "the download is incomplete; fetch the missing files",
            )
        return [folder / n for n in names]
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise ModelNotFoundError(
            f"{folder}: no *.safetensors weights found",
            "point at a Hugging Face model folder (config.json, *.safetensors, tokenizer files)",
        )
    return shards


def read_header(shard: Path) -> list[TensorRef]:
    """The tensors a shard holds, each byte range checked against the file's length."""
    size = shard.stat().st_size
    with open(shard, "rb") as fh:
        raw_len = fh.read(8)
        if len(raw_len) != 8:
            raise InvalidModelFileError(f"{shard}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise InvalidModelFileError(f"{shard}: header length {header_len} does not fit the file")
        try:
            header = json.loads(fh.read(header_len))
        except ValueError as exc:
            raise InvalidModelFileError(f"{shard}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidModelFileError(f"{shard}: safetensors header is not a JSON object")
    base = 8 + header_len
    refs = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        refs.append(_tensor_ref(shard, name, entry, base, size))
    return refs


def _tensor_ref(shard: Path, name: str, entry: object, base: int, size: int) -> TensorRef:
    try:
        dtype = str(entry["dtype"])  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(x) for x in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise InvalidModelFileError(f"{shard}: malformed header entry for tensor {name!r}") from None
    if dtype not in DTYPES:
        raise UnsupportedModelError(
            f"{shard.name}: tensor {name!r} is {dtype}; only F32, F16 and BF16 weights convert",
            "quantized or FP8 checkpoints need their original float weights",
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if begin < 0 or end - begin != expected or base + end > size:
        raise InvalidModelFileError(
            f"{shard}: tensor {name!r} byte range [{begin}, {end}) does not match its shape "
            f"{list(shape)} ({dtype}) or the file's length",
            "the file is truncated or damaged; download it again",
        )
    return TensorRef(name, shard, dtype, shape, base + begin, base + end)


def read_rows(ref: TensorRef, first: int, count: int) -> np.ndarray:
    """Rows ``[first, first + count)`` of a tensor as float32 (a fresh buffer, not a map)."""
    row_elems = math.prod(ref.shape[1:]) if len(ref.shape) > 1 else 1
    dt = DTYPES[ref.dtype]
    offset = ref.start + first * row_elems * dt.itemsize
    raw = np.fromfile(ref.shard, dtype=dt, count=count * row_elems, offset=offset)
    if raw.size != count * row_elems:
        raise InvalidModelFileError(f"{ref.shard}: tensor {ref.name!r} is cut short")
    if ref.dtype == "BF16":
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.astype(np.float32, copy=False)
    return values.reshape((count, *ref.shape[1:]) if len(ref.shape) > 1 else (count,))


def row_slabs(ref: TensorRef) -> Iterator[tuple[int, int]]:
    """``(first_row, n_rows)`` slabs covering a tensor, each about ``SLAB_BYTES`` as float32."""
    n_rows = ref.shape[0] if ref.shape else 1
    row_bytes = max(1, (math.prod(ref.shape[1:]) if len(ref.shape) > 1 else 1) * 4)
    step = max(1, SLAB_BYTES // row_bytes)
    for first in range(0, n_rows, step):
        yield first, min(step, n_rows - first)


def hash_files(paths: Iterable[Path], root: Path) -> str:
    """sha256 over each file's relative name, length and bytes, streamed in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(str(os.path.getsize(path)).encode() + b"\0")
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
