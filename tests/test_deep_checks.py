"""The whole-file checks a new model file gets before any native code sees it: each case here
passed the cheap header readers and crashed llama.cpp or LiteRT (found by fuzz_formats.py)."""

from __future__ import annotations

import mmap
import re
import struct
from pathlib import Path

import pytest
from test_gguf_file import BASE_DATA, BASE_INFOS, T_STRING, gguf_bytes, gstr, kv_array, kv_str, kv_u32, tensor_info

from edge_runtime.errors import InvalidModelFileError
from edge_runtime.formats.deep_checks import check_deeply
from edge_runtime.formats.gguf import read_gguf_header
from edge_runtime.formats.tflite import _FlatModel, read_tflite_layout

LAYERS = kv_u32("llama.block_count", 2)
T_FLOAT32 = 6  # GGUF's FLOAT32 value type


def kv_f32(key: str, value: float) -> bytes:
    return gstr(key) + struct.pack("<If", T_FLOAT32, value)


def tokens(*words: str) -> bytes:
    return kv_array("tokenizer.ggml.tokens", T_STRING, len(words), b"".join(gstr(w) for w in words))


@pytest.mark.parametrize("kvs, message", [
    ([kv_u32("llama.block_count", 0)], "block_count is 0, not 1 to 512"),
    ([kv_u32("llama.block_count", 513)], "block_count is 513, not 1 to 512"),
    ([LAYERS, kv_u32("llama.nextn_predict_layers", 3)], "nextn_predict_layers is 3, more than the 2 blocks"),
    ([LAYERS, kv_u32("llama.expert_used_count", 2)], "2 of 0 experts used"),
    ([LAYERS, kv_u32("llama.expert_count", 8), kv_u32("llama.expert_used_count", 0)], "8 experts, 0 used"),
    ([LAYERS, kv_u32("llama.expert_count", 8), kv_u32("llama.expert_used_count", 2),
      kv_u32("llama.expert_group_count", 3), kv_u32("llama.expert_group_used_count", 1)], "in 3 groups"),
    ([LAYERS, kv_str("llama.rope.scaling.type", "cubic")], "rope.scaling.type 'cubic' is not one of"),
    ([LAYERS, kv_u32("llama.context_length", 2**31)], "context_length is 2147483648, not 1 to"),
    ([LAYERS, kv_u32("llama.context_length", 0)], "context_length is 0, not 1 to"),
    ([LAYERS, kv_f32("llama.attention.layer_norm_rms_epsilon", float("-inf"))], "layer_norm_rms_epsilon is -inf"),
    ([LAYERS, kv_f32("llama.attention.layer_norm_epsilon", float("nan"))], "layer_norm_epsilon is nan"),
    ([LAYERS, kv_f32("llama.attention.layer_norm_rms_epsilon", -1e-5)], "not a finite value >= 0"),
    ([LAYERS, tokens("a", "b", "a")], "token 2 b'a' is token 0 again"),
    ([LAYERS, tokens("", "[EMPTY_0]")], "token 1 b'[EMPTY_0]' is token 0 again"),  # llama.cpp's name for ""
])
def test_gguf_files_llama_cpp_aborts_on_are_refused(tmp_path, kvs, message):
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", "llama"), *kvs], BASE_INFOS, BASE_DATA))
    read_gguf_header(path)  # well formed for the header walk
    with pytest.raises(InvalidModelFileError, match=re.escape(message)) as info:
        check_deeply(path, "gguf")
    assert info.value.message.startswith(f"{path}: ") and "\n" not in info.value.message


def test_a_weight_of_an_integer_type_is_refused(tmp_path):
    """fuzz_formats.py (seed 2): a weight retyped I32 loaded, and the first token was a SIGSEGV."""
    i32 = 26  # GGML_TYPE_I32
    infos = [tensor_info("blk.0.attn_q.weight", [8, 2], i32, 0), BASE_INFOS[1]]
    path = tmp_path / "m.gguf"
    path.write_bytes(gguf_bytes([kv_str("general.architecture", "llama"), LAYERS], infos, BASE_DATA))
    read_gguf_header(path)
    with pytest.raises(InvalidModelFileError, match="tensor 'blk.0.attn_q.weight' holds I32, an integer type"):
        check_deeply(path, "gguf")


def test_a_real_gguf_model_passes(smollm2_path):
    check_deeply(smollm2_path, "gguf")  # 49,152 tokens, none twice; the embedded model's hyperparameters


@pytest.fixture(scope="module")
def tflite(request, tiny_llama_dir) -> Path:
    from test_tflite import _converted  # skips, with its reason, where LiteRT or litert-torch is missing

    return _converted(request, tiny_llama_dir, "none")


def edited(seed: Path, out: Path, edit) -> Path:
    """A copy of ``seed`` (with its companions) after ``edit(model, data)`` changed its bytes."""
    data = bytearray(seed.read_bytes())
    with seed.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
        edit(_FlatModel(seed.name, view, len(data)), data)
    out.mkdir()
    for companion in seed.parent.iterdir():
        if companion != seed:
            (out / companion.name).write_bytes(companion.read_bytes())
    (out / seed.name).write_bytes(bytes(data))
    return out / seed.name


def first_operator(m: _FlatModel, builtin: int) -> tuple[int, int]:
    """(subgraph, operator table) of the first operator with this builtin code."""
    codes = m._tables(m.root, 1)
    for s, subgraph in enumerate(m._tables(m.root, m.MODEL_SUBGRAPHS)):
        for op in m._tables(subgraph, 3):
            code = codes[m._scalar(op, 0, "I")]
            if max(m._scalar(code, 0, "b"), m._scalar(code, 3, "i")) == builtin:
                return s, op
    raise AssertionError(f"no operator {builtin} in the seed")


def wild_input_list(m: _FlatModel, data: bytearray) -> None:
    """The first operator's list of inputs points far past the end of the file."""
    _, op = first_operator(m, 9)  # FULLY_CONNECTED
    struct.pack_into("<I", data, m._field(op, 1), 1 << 30)


def omitted_mul_input(m: _FlatModel, data: bytearray) -> None:
    """MUL's first input is -1 (an omitted optional input, which MUL has none of)."""
    _, op = first_operator(m, 18)
    struct.pack_into("<i", data, m._vector(m._ref(op, 1))[0], -1)


def no_outputs(m: _FlatModel, data: bytearray) -> None:
    _, op = first_operator(m, 9)
    struct.pack_into("<I", data, m._ref(op, 2), 0)


def signature_output_twice(m: _FlatModel, data: bytearray) -> None:
    """Two of the decode signature's outputs name the same tensor."""
    sig = next(s for s in m._tables(m.root, m.MODEL_SIGNATURES) if m._string(s, m.SIG_KEY) == "decode")
    first, second = m._tables(sig, m.SIG_OUTPUTS)[:2]
    struct.pack_into("<I", data, m._field(second, m.MAP_INDEX), m._scalar(first, m.MAP_INDEX, "I"))


def output_on_a_constant(m: _FlatModel, data: bytearray) -> None:
    """FULLY_CONNECTED's output tensor is given its weights' (read-only, mapped) buffer."""
    s, op = first_operator(m, 9)
    tensors = m._tables(m._tables(m.root, m.MODEL_SUBGRAPHS)[s], m.SUBGRAPH_TENSORS)
    weights = tensors[struct.unpack_from("<i", data, m._vector(m._ref(op, 1))[0] + 4)[0]]
    output = tensors[struct.unpack_from("<i", data, m._vector(m._ref(op, 2))[0])[0]]
    struct.pack_into("<I", data, m._field(output, 2), m._scalar(weights, 2, "I"))


def two_operators_in_one_opcode(m: _FlatModel, data: bytearray) -> None:
    """MUL's opcode says MUL in its new field and SPLIT (49) in its old one: LiteRT runs the larger."""
    _, op = first_operator(m, 18)
    code = m._tables(m.root, 1)[m._scalar(op, 0, "I")]
    struct.pack_into("<b", data, m._field(code, 0), 49)


def short_slice(m: _FlatModel, data: bytearray) -> None:
    """SLICE's list of inputs cut from (input, begin, size) to its first."""
    _, op = first_operator(m, 65)
    struct.pack_into("<I", data, m._ref(op, 1), 1)


def omitted_weights(m: _FlatModel, data: bytearray) -> None:
    """FULLY_CONNECTED's weights are -1, an omitted input (only its bias may be: a SIGSEGV, fuzz seed 2)."""
    _, op = first_operator(m, 9)
    struct.pack_into("<i", data, m._vector(m._ref(op, 1))[0] + 4, -1)


def omitted_reshape_shape(m: _FlatModel, data: bytearray) -> None:
    """RESHAPE's second input is -1: with two inputs its kernel reads the shape tensor (a SIGSEGV)."""
    for subgraph in m._tables(m.root, m.MODEL_SUBGRAPHS):
        for op in m._tables(subgraph, 3):
            code = m._tables(m.root, 1)[m._scalar(op, 0, "I")]
            start, n = m._vector(m._ref(op, 1))
            if max(m._scalar(code, 0, "b"), m._scalar(code, 3, "i")) == 22 and n == 2:
                struct.pack_into("<i", data, start + 4, -1)
                return
    raise AssertionError("no RESHAPE with a shape input in the seed")


@pytest.mark.parametrize("edit, message", [
    (omitted_weights, "operator 9 of subgraph 0 uses tensor -1"),
    (omitted_reshape_shape, "operator 22 of subgraph"),
    (short_slice, "operator 65 of subgraph 0 has 1 inputs, not the 3 it reads"),
    (output_on_a_constant, "is written by the model but uses constant buffer"),
    (two_operators_in_one_opcode, "names operator 18 and, in its old field, operator 49"),
    (wild_input_list, "beyond the file"),
    (omitted_mul_input, "operator 18 of subgraph"),
    (no_outputs, "has no inputs or no outputs"),
    (signature_output_twice, "twice or not as one of its subgraph's outputs"),
])
def test_tflite_files_litert_crashes_on_are_refused(tflite, tmp_path, edit, message):
    path = edited(tflite, tmp_path / "m", edit)
    read_tflite_layout(path)  # the cheap reader does not look where the damage is
    with pytest.raises(InvalidModelFileError, match=re.escape(message)):
        check_deeply(path, "tflite")


def test_a_converted_tflite_file_passes(tflite):
    check_deeply(tflite, "tflite")


def float_tokens(m: _FlatModel, data: bytearray) -> None:
    """The decode signature's tokens input is float16 (the runtime writes int32 ids into it)."""
    sig = next(s for s in m._tables(m.root, m.MODEL_SIGNATURES) if m._string(s, m.SIG_KEY) == "decode")
    entry = next(e for e in m._tables(sig, m.SIG_INPUTS) if m._string(e, m.MAP_NAME) == "tokens")
    subgraph = m._tables(m.root, m.MODEL_SUBGRAPHS)[m._scalar(sig, m.SIG_SUBGRAPH, "I")]
    tensor = m._tables(subgraph, m.SUBGRAPH_TENSORS)[m._scalar(entry, m.MAP_INDEX, "I")]
    struct.pack_into("<b", data, m._field(tensor, m.TENSOR_TYPE), 1)


def test_a_tokens_input_that_is_not_int32_is_refused_by_the_layout_reader(tflite, tmp_path):
    with pytest.raises(InvalidModelFileError, match="the decode signature's tokens is float16, not int32"):
        read_tflite_layout(edited(tflite, tmp_path / "m", float_tokens))


def _signature_tensor(m: _FlatModel, key: str, outputs: bool, name: str) -> int:
    sig = next(s for s in m._tables(m.root, m.MODEL_SIGNATURES) if m._string(s, m.SIG_KEY) == key)
    entries = m._tables(sig, m.SIG_OUTPUTS if outputs else m.SIG_INPUTS)
    entry = next(e for e in entries if m._string(e, m.MAP_NAME) == name)
    subgraph = m._tables(m.root, m.MODEL_SUBGRAPHS)[m._scalar(sig, m.SIG_SUBGRAPH, "I")]
    return m._tables(subgraph, m.SUBGRAPH_TENSORS)[m._scalar(entry, m.MAP_INDEX, "I")]


def headless_cache_output(m: _FlatModel, data: bytearray) -> None:
    """A prefill signature's KV cache output with 0 heads (fuzz seed 2: a SIGFPE in LiteRT)."""
    tensor = _signature_tensor(m, "prefill_8", True, "kv_cache_k_1")
    struct.pack_into("<i", data, m._vector(m._ref(tensor, m.TENSOR_SHAPE))[0] + 8, 0)


def shape_of_a_million_dimensions(m: _FlatModel, data: bytearray) -> None:
    """A flipped bit in the length of a KV input's shape (fuzz seed 2: minutes walking it)."""
    tensor = _signature_tensor(m, "decode", False, "kv_cache_v_1")
    struct.pack_into("<I", data, m._ref(tensor, m.TENSOR_SHAPE), 262148)


def no_logits_output(m: _FlatModel, data: bytearray) -> None:
    """The decode signature's logits output renamed (fuzz seed 2: a KeyError escaped)."""
    sig = next(s for s in m._tables(m.root, m.MODEL_SIGNATURES) if m._string(s, m.SIG_KEY) == "decode")
    entry = next(e for e in m._tables(sig, m.SIG_OUTPUTS) if m._string(e, m.MAP_NAME) == "logits")
    start, _ = m._vector(m._ref(entry, m.MAP_NAME), 1)
    data[start] = ord("L")


def empty_positions(m: _FlatModel, data: bytearray) -> None:
    """prefill_8's input_pos of shape [0] (fuzz seed 2: LiteRT refused the 8 positions written into it)."""
    tensor = _signature_tensor(m, "prefill_8", False, "input_pos")
    struct.pack_into("<i", data, m._vector(m._ref(tensor, m.TENSOR_SHAPE))[0], 0)


def test_tflite_files_the_layout_reader_refuses(tflite, tmp_path):
    with pytest.raises(InvalidModelFileError, match="logits shape None"):
        read_tflite_layout(edited(tflite, tmp_path / "c", no_logits_output))
    with pytest.raises(InvalidModelFileError, match=re.escape("input_pos has shape [0], not [8]")):
        read_tflite_layout(edited(tflite, tmp_path / "d", empty_positions))
    with pytest.raises(InvalidModelFileError, match=re.escape("kv_cache_k_1 is float32 [1, 128, 0, 16], unlike")):
        read_tflite_layout(edited(tflite, tmp_path / "a", headless_cache_output))
    with pytest.raises(InvalidModelFileError, match="has 262148 dimensions"):
        read_tflite_layout(edited(tflite, tmp_path / "b", shape_of_a_million_dimensions))


def gigabyte_activation(m: _FlatModel, data: bytearray) -> None:
    """An operator's output of shape [1, 2**31 - 1] (fuzz seed 2: LiteRT zeroes 8 GiB at load)."""
    _, op = first_operator(m, 9)  # FULLY_CONNECTED
    s = next(i for i, sg in enumerate(m._tables(m.root, m.MODEL_SUBGRAPHS)) if op in m._tables(sg, 3))
    tensors = m._tables(m._tables(m.root, m.MODEL_SUBGRAPHS)[s], m.SUBGRAPH_TENSORS)
    output = tensors[struct.unpack_from("<i", data, m._vector(m._ref(op, 2))[0])[0]]
    start, n = m._vector(m._ref(output, m.TENSOR_SHAPE))
    struct.pack_into("<i", data, start + 4 * (n - 1), 2**31 - 1)


def test_a_tensor_far_larger_than_the_model_is_refused(tflite, tmp_path):
    path = edited(tflite, tmp_path / "m", gigabyte_activation)
    with pytest.raises(InvalidModelFileError, match="more than any tensor of a 1 MiB model needs"):
        check_deeply(path, "tflite")
