"""The external-data references of an ONNX graph, read from the protobuf wire format itself.

onnxruntime reads a tensor's bytes from ``location`` (relative to the model's folder), from
``offset`` for ``length`` bytes, when the tensor says so in its ``external_data`` entries.
``external_references`` finds every such entry without an ONNX library: it walks the serialized
``ModelProto`` over a memory map, descending only into the messages that can hold a tensor (graphs,
nodes, attributes, functions, sparse tensors, subgraphs of If/Loop) and skipping every other field
by its length, so a graph of any size is covered without being read whole, and a length or varint
that points past its message is an error instead of a wrong answer.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import InvalidModelFileError

# The messages on the way to a tensor, and which of their fields hold which message (onnx.proto).
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _FUNCTION, _SPARSE, _TRAINING, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},
    # t, g, tensors, graphs, sparse_tensor, sparse_tensors
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
}
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
_MAX_DEPTH = 100  # protobuf's own nesting limit: onnxruntime refuses anything deeper


@dataclass(frozen=True)
class ExternalReference:
    """One tensor's bytes kept outside the graph: where, from where, how many (None: to the end)."""

    tensor: str
    location: str
    offset: int
    length: int | None


def external_references(graph_file: Path) -> list[ExternalReference]:
    """Every external-data reference in the ONNX graph ``graph_file``, in file order."""
    try:
        with graph_file.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise InvalidModelFileError(f"{graph_file}: empty file, not an ONNX graph")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return _Walker(graph_file, view).walk()
    except OSError as exc:
        raise InvalidModelFileError(f"{graph_file}: cannot read: {exc.strerror or exc}") from None


class _Walker:
    """One pass over a serialized ModelProto; every length is checked against its message."""

    def __init__(self, path: Path, view: mmap.mmap) -> None:
        self.path, self.view = path, view
        self.found: list[ExternalReference] = []

    def bad(self, why: str, pos: int) -> InvalidModelFileError:
        return InvalidModelFileError(f"{self.path}: not a valid ONNX graph ({why} at byte {pos})",
                                     "convert the model again, or copy the whole folder")

    def varint(self, pos: int, end: int) -> tuple[int, int]:
        value, shift, view = 0, 0, self.view
        while True:
            if pos >= end or shift > 63:
                raise self.bad("a varint runs past its message", pos)
            byte = view[pos]
            value |= (byte & 0x7F) << shift
            pos += 1
            if byte < 0x80:
                return value, pos
            shift += 7

    def fields(self, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
        """(field number, wire type, value or payload start, payload end) of each field."""
        pos = start
        while pos < end:
            tag, pos = self.varint(pos, end)
            number, wire = tag >> 3, tag & 7
            if wire == _VARINT:
                value, pos = self.varint(pos, end)
                yield number, wire, value, pos
                continue
            if wire == _LENGTH:
                size, pos = self.varint(pos, end)
                stop = pos + size
            elif wire in (_FIXED64, _FIXED32):
                stop = pos + (8 if wire == _FIXED64 else 4)
            else:  # groups (3, 4) are not in onnx.proto; 6 and 7 are not wire types at all
                raise self.bad(f"wire type {wire} in field {number}", pos)
            if stop > end:
                raise self.bad(f"field {number} of {stop - pos} bytes runs past its message", pos)
            yield number, wire, pos, stop
            pos = stop

    def walk(self) -> list[ExternalReference]:
        pending = [(_MODEL, 0, len(self.view), 0)]
        while pending:
            kind, start, end, depth = pending.pop()
            if depth > _MAX_DEPTH:
                raise self.bad(f"messages nested deeper than {_MAX_DEPTH}", start)
            if kind == _TENSOR:
                self.tensor(start, end)
                continue
            children = _CHILDREN[kind]
            inner = []
            for number, wire, first, stop in self.fields(start, end):
                if wire == _LENGTH and number in children:
                    inner.append((children[number], first, stop, depth + 1))
            pending.extend(reversed(inner))  # depth first, in file order
        return self.found

    def text(self, start: int, end: int) -> str:
        return bytes(self.view[start:end]).decode("utf-8", errors="replace")

    def tensor(self, start: int, end: int) -> None:
        name, location, entries = "", 0, []
        for number, wire, first, stop in self.fields(start, end):
            if number == _TENSOR_NAME and wire == _LENGTH:
                name = self.text(first, stop)
            elif number == _TENSOR_DATA_LOCATION and wire == _VARINT:
                location = first
            elif number == _TENSOR_EXTERNAL_DATA and wire == _LENGTH:
                key = value = None
                for k, kwire, kfirst, kstop in self.fields(first, stop):
                    if kwire == _LENGTH and k in (_ENTRY_KEY, _ENTRY_VALUE):
                        if k == _ENTRY_KEY:
                            key = self.text(kfirst, kstop)
                        else:
                            value = self.text(kfirst, kstop)
                entries.append((key, value, first))
        if not entries and location != _EXTERNAL:
            return
        # Checked even where data_location does not say EXTERNAL: a runtime that reads them anyway
        # must not find a path outside the folder.
        data = {key: (value, pos) for key, value, pos in entries}
        if "location" not in data or not data["location"][0]:
            raise self.bad(f"tensor {name!r} keeps its data outside the graph but names no location", start)
        self.found.append(ExternalReference(
            tensor=name, location=data["location"][0], offset=self.count(data, "offset", name) or 0,
            length=self.count(data, "length", name)))

    def count(self, data: dict[str | None, tuple[str | None, int]], key: str, tensor: str) -> int | None:
        if key not in data:
            return None
        value, pos = data[key]
        if value is None or not value.isascii() or not value.isdigit() or len(value) > 20:
            raise self.bad(f"tensor {tensor!r}: external data {key} {value!r} is not a byte count", pos)
        return int(value)
