"""Mutations of model files for ``fuzz_formats.py``: blind ones (bit flips, splices, truncations)
and field-aware ones that target what each reader must check.

Each format has a map of its seed's fields (``gguf_fields``, ``tflite_fields``: byte positions by
kind, found by walking the seed, which is trusted) and a ``mutate_*`` function that writes one
mutant into a folder and returns the path to load. Every choice comes from the ``random.Random``
it is given, so a seed and a count give the same mutants on every run.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import struct
from pathlib import Path
from typing import Any

Fields = dict[str, list[tuple[int, str]]]  # kind -> [(byte offset, struct format)]

# GGUFValueType numbers (gguf/constants.py) and the struct format of each scalar.
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
GGUF_KINDS = ("bitflip", "splice", "truncate", "count", "strlen", "vtype", "arraylen", "scalar", "ndims", "dim",
              "ttype", "toffset", "token")
TFLITE_KINDS = ("bitflip", "splice", "truncate", "vtable", "offset", "veclen", "shape", "ttype", "bufidx", "opidx",
                "bufoff", "sigidx", "opcode")
ONNX_KINDS = ("config", "config_bytes", "graph_bytes", "location", "offset", "length", "entry_bytes",
              "data_truncate", "symlink")


def interesting(rng: random.Random, fmt: str, original: Any) -> Any:
    """A value for a field of struct format ``fmt`` that a reader has to think about."""
    if fmt[-1] in "fd":
        return rng.choice([0.0, -1.0, math.nan, math.inf, -math.inf, 1e30, -1e-30, float(original) * 1e6])
    bits = struct.calcsize(fmt) * 8
    original = int(original)
    choices = [0, 1, 2, 3, -1, original + 1, original - 1, original * 2, original // 2, original * 1000,
               2 ** (bits - 1) - 1, 2 ** (bits - 1), 2**bits - 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, rng.randrange(2**bits), rng.randrange(64)]
    return rng.choice(choices) % 2**bits


def put(data: bytearray, pos: int, fmt: str, value: Any) -> None:
    """Write ``value`` at ``pos`` (integers wrap to the field's width, as a hostile writer's would)."""
    if fmt[-1] in "fd":
        struct.pack_into(fmt, data, pos, value)
    else:
        struct.pack_into(fmt[0] + fmt[-1].upper(), data, pos, int(value) % 2 ** (struct.calcsize(fmt) * 8))


def edit_field(rng: random.Random, data: bytearray, fields: Fields, kind: str) -> None:
    pos, fmt = rng.choice(fields[kind])
    (original,) = struct.unpack_from(fmt, data, pos)
    put(data, pos, fmt, interesting(rng, fmt, original))


def blind(rng: random.Random, data: bytearray, kind: str, hot: list[int] | None = None) -> bytearray:
    """Bit flips, splices or a truncation, mostly at or just after the ``hot`` positions (the
    fields a reader walks), else anywhere."""

    def where() -> int:
        if hot and rng.random() < 0.7:
            return min(rng.choice(hot) + rng.randrange(8), len(data) - 1)
        return rng.randrange(len(data))

    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            data[where()] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[where():]
    else:  # splice: overwrite, insert or delete a run of bytes
        src, dst, n = where(), where(), rng.randint(1, 64)
        chunk = data[src:src + n]
        how = rng.choice(("overwrite", "insert", "delete"))
        if how == "overwrite":
            data[dst:dst + len(chunk)] = chunk
        elif how == "insert":
            data[dst:dst] = chunk
        else:
            del data[dst:dst + n]
    return data


# -- GGUF ----------------------------------------------------------------------------------------


def gguf_fields(data: bytes) -> Fields:
    """The seed's header fields by kind."""
    f: Fields = {k: [] for k in (*GGUF_KINDS, "skip")}
    f["count"] = [(8, "<Q"), (16, "<Q")]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(pos: int, kind: str = "strlen") -> int:
        f[kind].append((pos, "<Q"))
        return pos + 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(n_kv):
        key_pos = pos
        pos = string(pos)
        key = data[key_pos + 8:pos].decode()
        vtype = struct.unpack_from("<I", data, pos)[0]
        f["vtype"].append((pos, "<I"))
        pos += 4
        if vtype == _GGUF_STRING:
            pos = string(pos)
        elif vtype == _GGUF_ARRAY:
            etype, n = struct.unpack_from("<IQ", data, pos)
            f["vtype"].append((pos, "<I"))
            f["arraylen"].append((pos + 4, "<Q"))
            pos += 12
            # Long arrays (the vocabulary's) offer a few of their elements, so that edits of the
            # hyperparameters are not drowned out; every token stays a candidate for "token".
            offered = set(range(0, n, max(1, n // 8)))
            for i in range(n):
                if etype == _GGUF_STRING:
                    kind = "token" if key == "tokenizer.ggml.tokens" else "strlen" if i in offered else "skip"
                    pos = string(pos, kind)
                else:
                    if i in offered:
                        f["scalar"].append((pos, _GGUF_SCALARS[etype]))
                    pos += struct.calcsize(_GGUF_SCALARS[etype])
        else:
            f["scalar"].append((pos, _GGUF_SCALARS[vtype]))
            pos += struct.calcsize(_GGUF_SCALARS[vtype])
    for _ in range(n_tensors):
        pos = string(pos)
        n_dims = struct.unpack_from("<I", data, pos)[0]
        f["ndims"].append((pos, "<I"))
        pos += 4
        for _ in range(n_dims):
            f["dim"].append((pos, "<q"))
            pos += 8
        f["ttype"].append((pos, "<i"))
        f["toffset"].append((pos + 4, "<Q"))
        pos += 12
    return f


def hot_positions(fields: Fields) -> list[int]:
    """Every position a field-aware mutation could target: where blind ones mostly land."""
    return sorted({pos for kind, spots in fields.items() for pos, _ in spots})


def mutate_gguf(rng: random.Random, seed: bytes, fields: Fields, hot: list[int], kind: str, folder: Path) -> Path:
    data = bytearray(seed)
    if kind in ("bitflip", "splice", "truncate"):
        data = blind(rng, data, kind, hot)
    elif kind == "token" and rng.random() < 0.5:  # one token's bytes over another's of the same length
        by_len: dict[int, list[int]] = {}
        for pos, _ in fields["token"]:
            by_len.setdefault(struct.unpack_from("<Q", data, pos)[0], []).append(pos)
        a, b = rng.sample(rng.choice([p for p in by_len.values() if len(p) > 1]), 2)
        n = struct.unpack_from("<Q", data, a)[0]
        data[b + 8:b + 8 + n] = data[a + 8:a + 8 + n]
    else:
        edit_field(rng, data, fields, kind)
    path = folder / "model.gguf"
    path.write_bytes(data)
    return path


# -- TFLite --------------------------------------------------------------------------------------

# schema.fbs: field index -> "<fmt" (scalar), "str", "bytes", ("ints", "<fmt") or ("tables", Table).
_TFL: dict[str, dict[int, Any]] = {
    "Model": {0: "<I", 1: ("tables", "OperatorCode"), 2: ("tables", "SubGraph"), 3: "str",
              4: ("tables", "Buffer"), 5: ("ints", "<i"), 6: ("tables", "Metadata"), 7: ("tables", "SignatureDef")},
    "OperatorCode": {0: "<b", 1: "str", 2: "<i", 3: "<i"},
    "SubGraph": {0: ("tables", "Tensor"), 1: ("ints", "<i"), 2: ("ints", "<i"), 3: ("tables", "Operator"), 4: "str"},
    "Tensor": {0: ("ints", "<i"), 1: "<b", 2: "<I", 3: "str", 5: "<B", 7: ("ints", "<i"), 8: "<B"},
    "Operator": {0: "<I", 1: ("ints", "<i"), 2: ("ints", "<i"), 3: "<B", 8: ("ints", "<i")},
    "Buffer": {0: "bytes", 1: "<Q", 2: "<Q"},
    "SignatureDef": {0: ("tables", "TensorMap"), 1: ("tables", "TensorMap"), 2: "str", 4: "<I"},
    "TensorMap": {0: "str", 1: "<I"},
    "Metadata": {0: "str", 1: "<I"},
}
# (table, field) -> the mutation kind that targets it
_TFL_KINDS = {("Tensor", 0): "shape", ("Tensor", 1): "ttype", ("Tensor", 2): "bufidx", ("Operator", 0): "opidx",
              ("Operator", 1): "opidx", ("Operator", 2): "opidx", ("Buffer", 1): "bufoff", ("Buffer", 2): "bufoff",
              ("SignatureDef", 4): "sigidx", ("TensorMap", 1): "sigidx", ("SubGraph", 1): "opidx",
              ("SubGraph", 2): "opidx", ("OperatorCode", 0): "opcode", ("OperatorCode", 2): "opcode",
              ("OperatorCode", 3): "opcode"}


def tflite_fields(data: bytes) -> Fields:
    """The seed's FlatBuffer fields by kind (tables, vtables, vectors and the scalars we target)."""
    f: Fields = {k: [] for k in TFLITE_KINDS}
    u32 = lambda p: struct.unpack_from("<I", data, p)[0]
    seen: set[int] = set()

    def table(pos: int, name: str) -> None:
        if pos in seen:
            return
        seen.add(pos)
        f["vtable"].append((pos, "<i"))
        vt = pos - struct.unpack_from("<i", data, pos)[0]
        vsize = struct.unpack_from("<H", data, vt)[0]
        f["vtable"] += [(vt, "<H"), (vt + 2, "<H")]
        for field, kind in _TFL[name].items():
            slot = 4 + 2 * field
            if slot + 2 > vsize or not struct.unpack_from("<H", data, vt + slot)[0]:
                continue
            f["vtable"].append((vt + slot, "<H"))
            at = pos + struct.unpack_from("<H", data, vt + slot)[0]
            if isinstance(kind, str) and kind.startswith("<"):
                f[_TFL_KINDS.get((name, field), "vtable")].append((at, kind))
                continue
            f["offset"].append((at, "<I"))
            vec = at + u32(at)
            f["bufoff" if kind == "bytes" else "veclen"].append((vec, "<I"))  # a buffer's length: "bufoff"
            n = u32(vec)
            if isinstance(kind, tuple) and kind[0] == "ints":
                target = _TFL_KINDS.get((name, field), "veclen")
                f[target] += [(vec + 4 + 4 * i, kind[1]) for i in range(n)]
            elif isinstance(kind, tuple):
                for i in range(n):
                    elem = vec + 4 + 4 * i
                    f["offset"].append((elem, "<I"))
                    table(elem + u32(elem), kind[1])

    table(u32(0), "Model")
    return f


def mutate_tflite(rng: random.Random, seed: Path, fields: Fields, hot: list[int], kind: str, folder: Path) -> Path:
    data = bytearray(seed.read_bytes())
    if kind in ("bitflip", "splice", "truncate"):
        data = blind(rng, data, kind, hot)
    else:
        edit_field(rng, data, fields, kind)
    for companion in seed.parent.iterdir():  # the tokenizer and the description, as converted
        if companion != seed and companion.is_file():
            link_or_copy(companion, folder / companion.name)
    path = folder / seed.name
    path.write_bytes(data)
    return path


# -- ONNX ----------------------------------------------------------------------------------------


def mutate_onnx(rng: random.Random, seed: Path, outside: Path, kind: str, folder: Path) -> Path:
    """A mutated copy of the ONNX folder ``seed`` in ``folder``; ``outside`` holds the bait files
    (a copy of the seed, which would load fine if a path led there)."""
    target = folder / seed.name
    target.mkdir()
    for file in seed.iterdir():
        link_or_copy(file, target / file.name)  # replaced (never written through) where mutated
    bait = outside / "model.onnx.data"

    def rewrite(name: str, data: bytes | str) -> None:
        (target / name).unlink()
        (target / name).write_bytes(data if isinstance(data, bytes) else data.encode())

    if kind == "config":
        rewrite("genai_config.json", json.dumps(_mutate_json(rng, json.loads((seed / "genai_config.json").read_text()),
                                                             outside)))
    elif kind in ("config_bytes", "graph_bytes"):
        name = "genai_config.json" if kind == "config_bytes" else "model.onnx"
        raw = bytearray((seed / name).read_bytes())
        rewrite(name, bytes(blind(rng, raw, rng.choice(("bitflip", "splice", "truncate")))))
    elif kind in ("location", "offset", "length"):
        rewrite("model.onnx", _edit_external_data(rng, seed / "model.onnx", kind, bait, target))
    elif kind == "entry_bytes":  # a length inside an external-data entry, parents left as they are
        raw = bytearray((seed / "model.onnx").read_bytes())
        spots = [i for i in range(len(raw) - 10) if raw[i:i + 10] == b"\x0a\x08location"]
        spot = rng.choice(spots)
        raw[spot + rng.choice((1, 10, 11))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        rewrite("model.onnx", bytes(raw))
    elif kind == "data_truncate":
        raw = (seed / "model.onnx.data").read_bytes()
        rewrite("model.onnx.data", raw[:rng.randrange(len(raw))])
    else:  # symlink: a file of the folder (or a new folder) becomes a link to a file outside
        name = rng.choice(("model.onnx.data", "model.onnx", "tokenizer.json", "genai_config.json", "sub"))
        if name == "sub":
            (target / "sub").symlink_to(outside, target_is_directory=True)
            rewrite("model.onnx", _edit_external_data(rng, seed / "model.onnx", "location", bait, target,
                                                      "sub/model.onnx.data"))
        else:
            (target / name).unlink()
            (target / name).symlink_to(outside / name)
    return target


def _mutate_json(rng: random.Random, config: Any, outside: Path) -> Any:
    """One leaf of genai_config.json changed (or removed), file names led out of the folder."""
    leaves: list[tuple[Any, Any]] = []
    pending = [config]
    while pending:
        node = pending.pop()
        for key, value in (node.items() if isinstance(node, dict) else enumerate(node)):
            leaves.append((node, key))
            if isinstance(value, dict | list):
                pending.append(value)
    node, key = rng.choice(leaves)
    if rng.random() < 0.1 and isinstance(node, dict):
        del node[key]
        return config
    values = [0, -1, 1, 2**31, 2**63, 1e308, 0.5, "x", None, [], {}, True, "9" * 5000, [[[[[[]]]]]]]
    if isinstance(key, str) and key.endswith("filename") or rng.random() < 0.1:
        values = ["../outside/model.onnx", str(outside / "model.onnx"), "model.onnx.data", "missing.onnx",
                  "sub/../../outside/model.onnx", "..\\outside\\model.onnx", ""]
    node[key] = rng.choice(values)
    return config


def _edit_external_data(rng: random.Random, graph: Path, kind: str, bait: Path, target: Path,
                        location: str | None = None) -> bytes:
    """The graph with one tensor's external-data entry changed (lengths re-encoded by onnx)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    tensor = rng.choice([t for t in model.graph.initializer if t.external_data])
    entries = {e.key: e for e in tensor.external_data}
    if kind == "location":
        link = target / "escape.data"
        choices = ["../outside/model.onnx.data", str(bait), "x" * rng.choice((127, 128, 200, 300, 20000)),
                   "./../outside/model.onnx.data", "sub/../../outside/model.onnx.data", "", "missing.data",
                   "model.onnx.data\0.txt", "..\\outside\\model.onnx.data", "escape.data", "/etc/hostname"]
        value = location or rng.choice(choices)
        if value == "escape.data":
            link.symlink_to(bait)
        entries["location"].value = value
    else:
        size = bait.stat().st_size
        value = rng.choice(["-1", "abc", "", "0", str(size), str(size + 1), str(2**63), str(2**64), "9" * 30,
                            " 12", "1e3", str(rng.randrange(size))])
        if kind in entries:
            entries[kind].value = value
        else:
            entry = tensor.external_data.add()
            entry.key, entry.value = kind, value
    return model.SerializeToString()


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the filesystem allows one (a mutant's unchanged files), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def clear(folder: Path) -> None:
    """Remove a mutant's folder (links inside it are removed, never followed)."""
    shutil.rmtree(folder, ignore_errors=True)
