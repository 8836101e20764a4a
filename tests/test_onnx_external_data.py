"""ONNX folders whose graph points outside them: every external-data reference is found (lengths
read as varints, graphs of any size), and any path or link leading out of the folder is refused,
before onnxruntime sees the folder.

The graphs are written here with a few lines of protobuf wire format, so that hostile ones (a
300 MiB graph, a location of 200 characters) are as easy to make as good ones; where the ``onnx``
package is installed, it reads them the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_runtime.errors import InvalidModelFileError
from edge_runtime.formats.onnx import read_onnx_folder
from edge_runtime.formats.onnx_external import external_references

MiB = 1 << 20


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def tensor(name: str, location: str, offset: str = "0", length: str = "64") -> bytes:
    """A TensorProto (float, 16 values) whose data lives in ``location``."""
    entries = b"".join(field(13, field(1, k.encode()) + field(2, v.encode()))
                       for k, v in (("location", location), ("offset", offset), ("length", length)))
    dims_and_type = field(1, varint(16)) + varint(2 << 3) + varint(1)
    return dims_and_type + field(8, name.encode()) + entries + varint(14 << 3) + varint(1)  # data_location EXTERNAL


def graph(*tensors: bytes) -> bytes:
    """A ModelProto holding a graph with these initializers."""
    return varint(1 << 3) + varint(8) + field(7, field(2, b"g") + b"".join(field(5, t) for t in tensors))


def onnx_folder(folder: Path, model: bytes, data: dict[str, int] | None = None) -> Path:
    """A folder read_onnx_folder accepts but for its graph: config, tokenizer, data files."""
    folder.mkdir(parents=True)
    config = {"model": {"type": "llama", "vocab_size": 32, "context_length": 64, "decoder": {
        "filename": "model.onnx", "num_hidden_layers": 1, "num_key_value_heads": 1, "head_size": 8}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.onnx").write_bytes(model)
    for name, size in (data or {"model.onnx.data": 1024}).items():
        (folder / name).write_bytes(b"\0" * size)
    return folder


def test_a_good_folder_lists_its_weight_files(tmp_path):
    folder = onnx_folder(tmp_path / "m", graph(tensor("a", "model.onnx.data"), tensor("b", "model.onnx.data", "64")))
    assert read_onnx_folder(folder).data_files == (folder / "model.onnx.data",)
    refs = external_references(folder / "model.onnx")
    assert [(r.tensor, r.location, r.offset, r.length) for r in refs] == [
        ("a", "model.onnx.data", 0, 64), ("b", "model.onnx.data", 64, 64)]


def test_a_location_longer_than_127_bytes_is_read_whole(tmp_path):
    long_name = "w" * 200 + ".bin"  # its length takes two varint bytes: one byte is not enough
    folder = onnx_folder(tmp_path / "m", graph(tensor("a", long_name, length="4096")), {long_name: 100})
    assert external_references(folder / "model.onnx")[0].location == long_name
    with pytest.raises(InvalidModelFileError, match=r"truncated \(100 bytes, the graph needs 4096\)"):
        read_onnx_folder(folder)


@pytest.mark.parametrize("location", [
    "../outside.bin", "/etc/hostname", "sub/../../outside.bin", "..\\outside.bin", "C:\\weights.bin",
    "./../outside.bin", "x" * 300 + "/../../../outside.bin",
])
def test_locations_leading_out_of_the_folder_are_refused(tmp_path, location):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 1024)
    folder = onnx_folder(tmp_path / "m", graph(tensor("a", "model.onnx.data"), tensor("b", location)))
    with pytest.raises(InvalidModelFileError, match="is outside the folder") as info:
        read_onnx_folder(folder)
    assert "\n" not in info.value.message


def test_links_leading_out_of_the_folder_are_refused(tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"\0" * 1024)
    folder = onnx_folder(tmp_path / "m", graph(tensor("a", "model.onnx.data")))
    (folder / "inside.bin").symlink_to("model.onnx.data")  # a link that stays inside is fine
    read_onnx_folder(folder)
    (folder / "model.onnx.data").unlink()
    (folder / "model.onnx.data").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(InvalidModelFileError, match="outside the model folder"):
        read_onnx_folder(folder)
    (folder / "model.onnx.data").unlink()
    (folder / "model.onnx.data").write_bytes(b"\0" * 1024)
    (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InvalidModelFileError, match="outside the model folder"):
        read_onnx_folder(folder)


def test_a_graph_of_300_mib_is_checked_all_the_same(tmp_path):
    """The old check skipped graphs over 256 MiB; this one walks any size without reading it whole."""
    folder = onnx_folder(tmp_path / "m", b"")
    big = 300 * MiB  # an initializer's raw_data, skipped by its length (a hole: no disk used)
    first = field(8, b"big") + varint(9 << 3 | 2) + varint(big)
    rest = field(5, tensor("escape", "../outside.bin"))
    body = field(2, b"g") + varint(5 << 3 | 2) + varint(len(first) + big) + first
    with (folder / "model.onnx").open("wb") as fh:
        fh.write(varint(1 << 3) + varint(8) + varint(7 << 3 | 2) + varint(len(body) + big + len(rest)) + body)
        fh.seek(big, os.SEEK_CUR)
        fh.write(rest)
    assert (folder / "model.onnx").stat().st_size > 256 * MiB
    assert [r.location for r in external_references(folder / "model.onnx")] == ["../outside.bin"]
    with pytest.raises(InvalidModelFileError, match="is outside the folder"):
        read_onnx_folder(folder)


@pytest.mark.parametrize("offset, length", [("-1", "64"), ("12abc", "64"), ("0", "9" * 5000), ("0", "")])
def test_offsets_and_lengths_that_are_not_byte_counts_are_refused(tmp_path, offset, length):
    folder = onnx_folder(tmp_path / "m", graph(tensor("a", "model.onnx.data", offset, length)))
    with pytest.raises(InvalidModelFileError, match="is not a byte count"):
        read_onnx_folder(folder)


@pytest.mark.parametrize("damage", [
    lambda g: g[:-3],  # cut inside the last field
    lambda g: g[:4] + b"\xff" * 12 + g[16:],  # a varint that never ends
    lambda g: g + varint(3 << 3 | 3),  # a group, which onnx.proto never uses
])
def test_a_damaged_graph_is_a_one_line_error(tmp_path, damage):
    folder = onnx_folder(tmp_path / "m", damage(graph(tensor("a", "model.onnx.data"))))
    with pytest.raises(InvalidModelFileError, match="not a valid ONNX graph"):
        read_onnx_folder(folder)


@pytest.mark.parametrize("where", [["model", "decoder"], ["model", "vision"]])
def test_file_names_in_genai_config_stay_in_the_folder(tmp_path, where):
    folder = onnx_folder(tmp_path / "m", graph(tensor("a", "model.onnx.data")))
    config = json.loads((folder / "genai_config.json").read_text())
    config[where[0]].setdefault(where[1], {})["filename"] = "../model.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelFileError, match="filename '../model.onnx' is outside the folder"):
        read_onnx_folder(folder)


def test_the_onnx_package_reads_these_graphs_the_same_way(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = graph(tensor("a", "w" * 200), tensor("b", "model.onnx.data", "64", "32"))
    proto = onnx.load_model_from_string(model)
    theirs = [(t.name, {e.key: e.value for e in t.external_data}) for t in proto.graph.initializer]
    ours = [(r.tensor, {"location": r.location, "offset": str(r.offset), "length": str(r.length)})
            for r in external_references(onnx_folder(tmp_path / "m", model) / "model.onnx")]
    assert ours == theirs
