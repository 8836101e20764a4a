"""The whole FlatBuffer of a .tflite file verified before LiteRT maps it, and its indices checked.

LiteRT's loader (``CompiledModel.from_file`` in ai-edge-litert 2.x) trusts the FlatBuffer: an
offset pointing out of the file makes it read wild memory and die with SIGSEGV. ``verify_tflite``
walks every table reachable from the root with the TFLite schema (below: the tables and fields
of ai-edge-litert 2.3's ``schema.fbs``), checking each table, vtable, field, string and vector
against the file's size and the tables' own sizes, then checks what the loader indexes with
(tensor, buffer, opcode, subgraph indices). Option tables of operators are checked for their
reference fields where the schema has any; the rest hold scalars, checked to lie inside their
table. It costs a walk of every table, so it runs once for a new file (``deep_checks``).
"""

from __future__ import annotations

import struct
from pathlib import Path

from edge_runtime.formats.tflite import _FlatModel, mapped_tflite

# A field: a scalar's size in bytes, "str", ("vec", element size), ("tables", Table), ("table",
# Table) or ("union", Union) (its type is the field before it).
_SCHEMA: dict[str, dict[int, object]] = {
    "Model": {0: 4, 1: ("tables", "OperatorCode"), 2: ("tables", "SubGraph"), 3: "str",
              4: ("tables", "Buffer"), 5: ("vec", 4), 6: ("tables", "Metadata"), 7: ("tables", "SignatureDef"),
              8: ("tables", "ExternalBufferGroup"), 9: ("tables", "ExternalBuffer")},
    "ExternalBuffer": {0: 4, 1: 4, 2: 8, 4: "str"},
    "ExternalBufferGroup": {0: "str"},
    "SignatureDef": {0: ("tables", "TensorMap"), 1: ("tables", "TensorMap"), 2: "str", 4: 4},
    "TensorMap": {0: "str", 1: 4},
    "Metadata": {0: "str", 1: 4},
    "Buffer": {0: ("vec", 1), 1: 8, 2: 8},
    "SubGraph": {0: ("tables", "Tensor"), 1: ("vec", 4), 2: ("vec", 4), 3: ("tables", "Operator"), 4: "str", 5: 4},
    "Operator": {0: 4, 1: ("vec", 4), 2: ("vec", 4), 3: 1, 4: ("union", "BuiltinOptions"), 5: ("vec", 1), 6: 1,
                 7: ("vec", 1), 8: ("vec", 4), 9: 8, 10: 8, 11: 1, 12: ("union", "BuiltinOptions2"), 13: 4},
    "Tensor": {0: ("vec", 4), 1: 1, 2: 4, 3: "str", 4: ("table", "QuantizationParameters"), 5: 1,
               6: ("table", "SparsityParameters"), 7: ("vec", 4), 8: 1, 9: ("tables", "VariantSubType"), 10: 4},
    "VariantSubType": {0: ("vec", 4), 1: 1, 2: 1},
    "SparsityParameters": {0: ("vec", 4), 1: ("vec", 4), 2: ("tables", "DimensionMetadata")},
    "DimensionMetadata": {0: 1, 1: 4, 2: 1, 3: ("union", "SparseIndexVector"), 4: 1, 5: ("union", "SparseIndexVector")},
    "QuantizationParameters": {0: ("vec", 4), 1: ("vec", 4), 2: ("vec", 4), 3: ("vec", 8), 4: 1,
                               5: ("union", "QuantizationDetails"), 6: 4},
    "OperatorCode": {0: 1, 1: "str", 2: 4, 3: 4},
    "CustomQuantization": {0: ("vec", 1)},
    "BlockwiseQuantization": {0: 4, 1: 4, 2: 4, 3: ("vec", 4)},
    "MultiAxisQuantization": {0: 4, 1: 4, 2: 4, 3: ("vec", 4)},
    "Int32Vector": {0: ("vec", 4)},
    "Uint16Vector": {0: ("vec", 2)},
    "Uint8Vector": {0: ("vec", 1)},
    # Operator options that hold more than scalars.
    "ConcatEmbeddingsOptions": {0: 4, 1: ("vec", 4), 2: ("vec", 4)},
    "FullyConnectedOptions": {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: ("vec", 1)},
    "ReshapeOptions": {0: ("vec", 4)},
    "SqueezeOptions": {0: ("vec", 4)},
    "VarHandleOptions": {0: "str", 1: "str"},
    "BucketizeOptions": {0: ("vec", 4)},
    "StablehloBroadcastInDimOptions": {0: ("vec", 8)},
    "StablehloSliceOptions": {0: ("vec", 8), 1: ("vec", 8), 2: ("vec", 8)},
    "StablehloConvolutionOptions": {0: ("vec", 8), 1: ("vec", 8), 2: ("vec", 8), 3: ("vec", 8), 4: ("vec", 1),
                                    5: 8, 6: 8, 7: ("vec", 8), 8: 8, 9: 8, 10: ("vec", 8), 11: 8, 12: 8,
                                    13: ("vec", 8), 14: 8, 15: 8, 16: ("vec", 4)},
    "StablehloCustomCallOptions": {0: "str", 1: 1, 2: "str", 3: 4, 4: ("vec", 4), 5: ("vec", 1)},
    "StablehloReduceOptions": {0: ("vec", 8), 1: 4},
    "StablehloScatterOptions": {0: 1, 1: ("vec", 8), 2: ("vec", 8), 3: ("vec", 8), 4: 8, 5: 1, 6: 4},
    "StablehloDynamicSliceOptions": {0: ("vec", 8)},
    "StablehloPadOptions": {0: ("vec", 8), 1: ("vec", 8), 2: ("vec", 8)},
    "StablehloDotGeneralOptions": {0: ("vec", 8), 1: ("vec", 8), 2: ("vec", 8), 3: ("vec", 8), 4: ("vec", 4)},
    "StablehloReduceWindowOptions": {0: ("vec", 8), 1: ("vec", 8), 2: ("vec", 8), 3: ("vec", 8), 4: ("vec", 8),
                                     5: 4},
    "StablehloGatherOptions": {0: ("vec", 8), 1: ("vec", 8), 2: ("vec", 8), 3: 8, 4: ("vec", 8), 5: 1},
    "StablehloTransposeOptions": {0: ("vec", 8)},
    "StableHLOCompositeOptions": {0: "str", 1: 4, 2: ("vec", 1), 3: 1, 4: 4},
    "StablehloCaseOptions": {0: ("vec", 4)},
}
# Union member types with references; any other member is a table of scalars ("*").
_UNIONS: dict[str, dict[int, str]] = {
    "BuiltinOptions": {3: "ConcatEmbeddingsOptions", 8: "FullyConnectedOptions", 17: "ReshapeOptions",
                       30: "SqueezeOptions", 111: "VarHandleOptions", 115: "BucketizeOptions"},
    "BuiltinOptions2": {2: "StablehloBroadcastInDimOptions", 3: "StablehloSliceOptions",
                        4: "StablehloConvolutionOptions", 5: "StablehloCustomCallOptions", 6: "StablehloReduceOptions",
                        7: "StablehloScatterOptions", 9: "StablehloDynamicSliceOptions", 10: "StablehloPadOptions",
                        12: "StablehloDotGeneralOptions", 13: "StablehloReduceWindowOptions",
                        16: "StablehloGatherOptions", 17: "StablehloTransposeOptions", 21: "StableHLOCompositeOptions",
                        23: "StablehloCaseOptions"},
    "QuantizationDetails": {1: "CustomQuantization", 2: "BlockwiseQuantization", 3: "MultiAxisQuantization"},
    "SparseIndexVector": {1: "Int32Vector", 2: "Uint16Vector", 3: "Uint8Vector"},
}
_PLACEHOLDER_FOR_GREATER_OP_CODES = 127
# Inputs the kernels of the operators a decoder uses read without counting them first (SLICE with
# one input is a SIGSEGV): operator -> how many it needs (schema.fbs's BuiltinOperator numbers).
_MIN_INPUTS = {
    **dict.fromkeys((6, 14, 19, 21, 25, 28, 43, 47, 53, 59, 66, 73, 75, 76, 77, 87, 93, 98, 101, 108, 114, 117,
                     150, 158), 1),  # DEQUANTIZE ... SIGN: the unary ones
    **dict.fromkeys((0, 7, 9, 18, 34, 36, 39, 40, 41, 42, 48, 49, 55, 56, 57, 58, 61, 62, 63, 70, 71, 72, 74, 78,
                     82, 84, 86, 90, 94, 95, 99, 107, 126, 128, 130, 140), 2),  # ADD ... REDUCE_ALL
    **dict.fromkeys((64, 65, 96, 123, 151), 3),  # SELECT, SLICE, RANGE, SELECT_V2, DYNAMIC_UPDATE_SLICE
    45: 4,  # STRIDED_SLICE
}
_MAX_DEPTH = 64  # the FlatBuffers verifier's default
_MAX_TABLES = 1_000_000
# TensorType -> bytes per element, for constant tensors' buffers (None: size not fixed by shape).
_ELEMENT_BITS = {0: 32, 1: 16, 2: 32, 3: 8, 4: 64, 6: 8, 7: 16, 8: 64, 9: 8, 10: 64, 11: 128, 12: 64, 15: 32,
                 16: 16, 17: 4, 18: 16, 19: 2, 20: 4, 21: 8, 22: 8}
_TENSOR_TYPES = range(23)
# LiteRT allocates every tensor of a signature at load: one dimension set to 2**31 asks for
# gigabytes (minutes of page zeroing, then the OOM killer on a Pi). No tensor of a decoder
# (weights, KV cache, attention scores, logits) comes near four times the whole file.
_ACTIVATION_FILE_RATIO, _ACTIVATION_FLOOR = 4, 256 << 20
# Builtin operators that take an omitted input (-1), and the first input that may be omitted:
# conv and fully-connected biases (after the input and the weights), TRANSPOSE_CONV's bias,
# PADV2's value, recurrent cells' optional gates, custom ops. A -1 anywhere else sends LiteRT
# reading tensor -1: FULLY_CONNECTED without weights, RESHAPE with a second input of -1 (its
# kernel reads a shape tensor whenever there are two inputs) are each a SIGSEGV (fuzz seed 2).
_OPTIONAL_INPUTS = {**dict.fromkeys((16, 24, 27, 32, 35, 44, 46, 52, 132, 141), 1),
                    3: 2, 4: 2, 9: 2, 60: 2, 67: 3}
# Operators without inputs or outputs (calls, control flow, custom ops, variables); any other with
# none makes LiteRT index an empty list.
_MAY_TAKE_NOTHING = {31, 32, 51, 118, 119, 129, 142, 173, 200, 206, 209}
_MAY_GIVE_NOTHING = {31, 32, 51, 118, 119, 129, 144, 173, 200, 206, 209}


def verify_tflite(path: str | Path) -> None:
    """Verify a .tflite file's whole FlatBuffer and its indices; ``InvalidModelFileError`` if not."""
    with mapped_tflite(path) as model:
        _Verifier(model).table(model.root, "Model", 0)
        _check_indices(model)


class _Verifier:
    """Every table, vtable, field and vector checked against the file and the table it is in."""

    def __init__(self, model: _FlatModel) -> None:
        self.m, self.view, self.size = model, model.view, model.size
        self.tables = 0

    def u16(self, pos: int) -> int:
        self.m._check(pos, 2)
        return struct.unpack_from("<H", self.view, pos)[0]

    def table(self, pos: int, name: str, depth: int) -> None:
        self.tables += 1
        if depth > _MAX_DEPTH or self.tables > _MAX_TABLES:
            raise self.m._bad(f"tables nested deeper than {_MAX_DEPTH} or more than {_MAX_TABLES}")
        if pos % 4:
            raise self.m._bad(f"a {name} table at unaligned offset {pos}")
        self.m._check(pos, 4)
        vtable = pos - struct.unpack_from("<i", self.view, pos)[0]
        if vtable % 2:
            raise self.m._bad(f"the vtable of a {name} table at unaligned offset {vtable}")
        vsize, osize = self.u16(vtable), self.u16(vtable + 2)
        if vsize < 4 or vsize % 2 or osize < 4:
            raise self.m._bad(f"a {name} table's vtable declares {vsize} and {osize} bytes")
        self.m._check(vtable, vsize)
        self.m._check(pos, osize)
        fields = _SCHEMA.get(name, {})
        for slot in range((vsize - 4) // 2):
            offset = self.u16(vtable + 4 + 2 * slot)
            if not offset:
                continue
            kind = fields.get(slot, 1)  # unknown fields (a newer schema): at least one byte inside the table
            width = kind if isinstance(kind, int) else 4
            if offset + width > osize:
                raise self.m._bad(f"field {slot} of a {name} table lies outside the table")
            if not isinstance(kind, int):
                self.reference(pos + offset, kind, name, slot, pos, vtable, depth)

    def reference(self, at: int, kind: object, name: str, slot: int, table: int, vtable: int, depth: int) -> None:
        if at % 4:
            raise self.m._bad(f"field {slot} of a {name} table at unaligned offset {at}")
        target = at + self.m._u32(at)
        if kind == "str":
            self.vector(target, 1, extra=1)
            return
        kind_name, arg = kind  # type: ignore[misc]
        if kind_name == "vec":
            self.vector(target, arg)
        elif kind_name == "table":
            self.table(target, arg, depth + 1)
        elif kind_name == "union":
            type_offset = self.u16(vtable + 4 + 2 * (slot - 1))  # checked to lie in the table already
            member = self.view[table + type_offset] if type_offset else 0
            self.table(target, _UNIONS[arg].get(member, "*"), depth + 1)
        else:  # a vector of tables
            start, n = self.vector(target, 4)
            for i in range(n):
                elem = start + 4 * i
                self.table(elem + self.m._u32(elem), arg, depth + 1)

    def vector(self, pos: int, elem: int, extra: int = 0) -> tuple[int, int]:
        if pos % 4:
            raise self.m._bad(f"a vector at unaligned offset {pos}")
        n = self.m._u32(pos)
        self.m._check(pos + 4, n * elem + extra)
        return pos + 4, n


def _check_indices(m: _FlatModel) -> None:
    """What LiteRT indexes arrays with: tensors, buffers, opcodes and subgraphs in range."""
    buffers = m._tables(m.root, m.MODEL_BUFFERS)
    opcodes = m._tables(m.root, 1)
    subgraphs = m._tables(m.root, m.MODEL_SUBGRAPHS)
    for i, code in enumerate(opcodes):
        # LiteRT runs max(deprecated, builtin): a file says the same twice (the old field capped at
        # 127), or only the old field; two different operators swap kernels and options (a SIGSEGV).
        old, new = m._scalar(code, 0, "b"), m._scalar(code, 3, "i")
        if new and old != min(new, _PLACEHOLDER_FOR_GREATER_OP_CODES):
            raise m._bad(f"opcode {i} names operator {new} and, in its old field, operator {old}")
    for s, subgraph in enumerate(subgraphs):
        tensors = m._tables(subgraph, m.SUBGRAPH_TENSORS)
        for field in (1, 2):  # the subgraph's inputs and outputs
            if not m._field(subgraph, field):
                raise m._bad(f"subgraph {s} has no list of inputs or of outputs")
            for index in _ints(m, subgraph, field):
                if not 0 <= index < len(tensors):
                    raise m._bad(f"subgraph {s} names tensor {index} of {len(tensors)}")
        for op in m._tables(subgraph, 3):
            if not m._field(op, 1) or not m._field(op, 2):  # LiteRT hands XNNPACK a null list
                raise m._bad(f"an operator of subgraph {s} has no list of inputs or of outputs")
            opcode = m._scalar(op, 0, "I")
            if opcode >= len(opcodes):
                raise m._bad(f"an operator of subgraph {s} uses opcode {opcode} of {len(opcodes)}")
            builtin = max(m._scalar(opcodes[opcode], 0, "b"), m._scalar(opcodes[opcode], 3, "i"))
            if (not _ints(m, op, 1) and builtin not in _MAY_TAKE_NOTHING
                    or not _ints(m, op, 2) and builtin not in _MAY_GIVE_NOTHING):
                raise m._bad(f"operator {builtin} of subgraph {s} has no inputs or no outputs")
            if len(_ints(m, op, 1)) < _MIN_INPUTS.get(builtin, 0):
                raise m._bad(f"operator {builtin} of subgraph {s} has {len(_ints(m, op, 1))} inputs, "
                             f"not the {_MIN_INPUTS[builtin]} it reads")
            optional_from = _OPTIONAL_INPUTS.get(builtin, 1 << 30)
            for field in (1, 2, 8):  # inputs, outputs, intermediates
                for position, index in enumerate(_ints(m, op, field)):
                    lowest = -1 if field == 8 or field == 1 and position >= optional_from else 0
                    if not lowest <= index < len(tensors):
                        raise m._bad(f"operator {builtin} of subgraph {s} uses tensor {index} of {len(tensors)}")
        written = {*_ints(m, subgraph, 1), *(i for op in m._tables(subgraph, 3) for i in _ints(m, op, 2))}
        for t, tensor in enumerate(tensors):
            _check_tensor(m, tensor, f"tensor {t} of subgraph {s}", buffers, written=t in written)
    for sig in m._tables(m.root, m.MODEL_SIGNATURES):
        index = m._scalar(sig, m.SIG_SUBGRAPH, "I")
        if index >= len(subgraphs):
            raise m._bad(f"a signature uses subgraph {index} of {len(subgraphs)}")
        for field, ends in ((m.SIG_INPUTS, 1), (m.SIG_OUTPUTS, 2)):  # LiteRT finds them among the subgraph's
            allowed, seen = set(_ints(m, subgraphs[index], ends)), set()
            for entry in m._tables(sig, field):
                tensor = m._scalar(entry, m.MAP_INDEX, "I")
                if tensor not in allowed or tensor in seen:
                    raise m._bad(f"signature {m._string(sig, m.SIG_KEY)!r} names tensor {tensor} twice or "
                                 f"not as one of its subgraph's {'inputs' if ends == 1 else 'outputs'}")
                seen.add(tensor)
    for meta in m._tables(m.root, m.MODEL_METADATA):
        if m._scalar(meta, m.META_BUFFER, "I") >= len(buffers):
            raise m._bad(f"metadata uses buffer {m._scalar(meta, m.META_BUFFER, 'I')} of {len(buffers)}")
    m.signatures()  # the signatures' tensor indices, checked as they are read
    m.buffers_bytes()  # buffers kept after the FlatBuffer lie inside the file


def _ints(m: _FlatModel, table: int, field: int) -> tuple[int, ...]:
    start, n = m._vector(m._ref(table, field))
    return struct.unpack_from(f"<{n}i", m.view, start) if n else ()


def _check_tensor(m: _FlatModel, tensor: int, what: str, buffers: list[int], *, written: bool) -> None:
    """A tensor's type, shape and buffer; a ``written`` one (an operator's output, a subgraph's
    input) must not hold constant data, which LiteRT maps read-only from the file (a SIGSEGV)."""
    kind = m._scalar(tensor, m.TENSOR_TYPE, "b")
    if kind not in _TENSOR_TYPES:
        raise m._bad(f"{what} has unknown type {kind}")
    shape = _ints(m, tensor, m.TENSOR_SHAPE)
    elements = 1
    for dim in shape:
        if dim < 0:
            raise m._bad(f"{what} has shape {list(shape)}")
        elements *= dim
    if elements >= 1 << 48:
        raise m._bad(f"{what} has {elements} elements")
    bits = _ELEMENT_BITS.get(kind) or 8
    if elements * bits // 8 > max(_ACTIVATION_FILE_RATIO * m.size, _ACTIVATION_FLOOR):
        raise m._bad(f"{what} has shape {list(shape)}: {elements * bits // 8 >> 20} MiB, more than any "
                     f"tensor of a {m.size >> 20} MiB model needs")
    index = m._scalar(tensor, 2, "I")
    if index >= max(len(buffers), 1):
        raise m._bad(f"{what} uses buffer {index} of {len(buffers)}")
    if not index:
        return
    _, held = m._vector(m._ref(buffers[index], m.BUFFER_DATA), 1)
    if m._scalar(buffers[index], m.BUFFER_OFFSET, "Q") > 1:
        held = m._scalar(buffers[index], m.BUFFER_SIZE, "Q")
    if held and written:
        raise m._bad(f"{what} is written by the model but uses constant buffer {index}")
    if kind not in _ELEMENT_BITS:
        return
    needed = -(-elements * _ELEMENT_BITS[kind] // 8)
    if held and held < needed:
        raise m._bad(f"{what} needs {needed} bytes but its buffer holds {held}")
