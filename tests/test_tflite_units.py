"""TFLite pieces that need no runtime: the version guard, prefill chunking, the tokenizer (shared
with ONNX), and the converter's checks of a source before any work. Sampling: test_sampling.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.backends.tflite.model import plan_chunks
from edge_runtime.formats.tflite import parse_version, runtime_too_old

KV_LEN = 128
PREFILL = (8, 32)


@pytest.mark.parametrize("text, expected", [
    ("2.17.0", (2, 17, 0)), ("2.14.0", (2, 14, 0)), ("2.17.0\0\0\0\0\0\0\0\0\0\0", (2, 17, 0)),
    ("2.16.0rc1", (2, 16, 0)), ("1.5", (1, 5)), (" 2.18.1.dev20240101 ", (2, 18, 1)),
])
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_the_tflite_runtime_guard_refuses_older_runtimes_only():
    assert runtime_too_old("2.14.0", "2.17.0")  # what tflite-runtime 2.14 would get wrong
    assert runtime_too_old("2.16.1", "2.17.0")
    assert not runtime_too_old("2.17.0", "2.17.0")
    assert not runtime_too_old("2.18", "2.17.0")
    assert not runtime_too_old("2.14.0", None)  # a file that asks for nothing
    with pytest.raises(ValueError):
        parse_version("abc")


def test_the_guard_names_the_runtime_and_the_extra(tmp_path):
    from edge_runtime.backends.tflite.engine import Runtime, check_runtime_supports
    from edge_runtime.errors import BackendUnavailableError

    class Layout:
        path = tmp_path / "m.tflite"
        min_runtime_version = "2.17.0"

    with pytest.raises(BackendUnavailableError) as err:
        check_runtime_supports(Runtime("tflite-runtime", "2.14.0", False), Layout())  # type: ignore[arg-type]
    assert "2.17.0" in err.value.message and "tflite-runtime 2.14.0" in err.value.message
    assert "edge-runtime[tflite]" in (err.value.hint or "")
    check_runtime_supports(Runtime("tflite-runtime", "2.17.1", False), Layout())  # type: ignore[arg-type]
    check_runtime_supports(Runtime("ai-edge-litert", "2.3.0", True), Layout())  # type: ignore[arg-type]


@pytest.mark.parametrize("n, pos, expected", [
    (1, 0, [("decode", 1, 1)]),
    (5, 0, [("prefill_8", 5, 8)]),
    (40, 0, [("prefill_32", 32, 32), ("prefill_8", 8, 8)]),
    (70, 0, [("prefill_32", 32, 32), ("prefill_32", 32, 32), ("prefill_8", 6, 8)]),
    (3, 125, [("decode", 1, 1)] * 3),  # no prefill fits before the cache ends
    (10, 118, [("prefill_8", 8, 8), ("decode", 1, 1), ("decode", 1, 1)]),
])
def test_prefill_chunks_never_pass_the_cache(n, pos, expected):
    steps = plan_chunks(n, pos, PREFILL, KV_LEN)
    assert steps == expected
    assert sum(real for _, real, _ in steps) == n
    at = pos
    for _, real, width in steps:
        assert at + width <= KV_LEN
        at += real


def test_the_tokenizer_beside_a_model_behaves_as_llama_cpp_tokenize(tiny_tokenizer_dir):
    from edge_runtime.backends.tokenizer import HFTokenizer

    tok = HFTokenizer(tiny_tokenizer_dir, eos_ids=[3])
    assert (tok.bos_token, tok.eos_token, tok.add_bos) == ("<|begin_of_text|>", "<|end_of_text|>", True)
    assert tok.is_end(1) and tok.is_end(3) and not tok.is_end(5)
    assert tok.encode("<|im_start|>user", special=True)[0] == 2
    assert 2 not in tok.encode("<|im_start|>user", special=False)
    assert tok.encode("hi", add_bos=True)[0] == 0 and tok.encode("hi")[0] != 0
    assert tok.chat_template and "<|im_start|>" in tok.chat_template


def test_generation_ends_on_end_of_turn_tokens_and_bos_only_where_the_model_adds_it(tiny_tokenizer_dir, tmp_path):
    from edge_runtime.backends.tokenizer import HFTokenizer

    # No end ids given: EOS (<|end_of_text|>, 1) and the end-of-turn <|im_end|> (3) still end it,
    # as llama.cpp's vocabulary marks both end of generation.
    tok = HFTokenizer(tiny_tokenizer_dir)
    assert tok.end_ids == {1, 3}
    # A tokenizer that adds no BOS: add_bos asks for BOS where the model adds one (llama.cpp's
    # add_special), so nothing is prepended; the template comes from chat_template.jinja.
    shutil.copy(tiny_tokenizer_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    template = config.pop("chat_template")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    (tmp_path / "chat_template.jinja").write_text(template)
    plain = HFTokenizer(tmp_path)
    assert not plain.add_bos and plain.encode("hi", add_bos=True) == tok.encode("hi")
    assert plain.chat_template == template


def test_a_folder_with_only_a_sentencepiece_model_is_one_clear_error(tmp_path):
    from edge_runtime.backends.tokenizer import HFTokenizer
    from edge_runtime.errors import UnsupportedModelError

    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(UnsupportedModelError) as err:
        HFTokenizer(tmp_path)
    assert "tokenizer.json" in err.value.message and "\n" not in err.value.message
    assert "convert the model again" in (err.value.hint or "")


def test_streamed_text_is_whole_characters_and_adds_up(tiny_tokenizer_dir):
    from edge_runtime.backends.tokenizer import HFTokenizer

    tok = HFTokenizer(tiny_tokenizer_dir)
    text = "Café déjà vu — 日本語のテキスト 🚀🦙 and\ttabs\n\n done"
    ids = tok.encode(text)
    prompt = tok.encode("Hello:")
    stream = tok.streaming_decoder(prompt)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    for piece in pieces:
        piece.decode("utf-8")  # every piece is valid UTF-8 on its own
    assert b"".join(pieces).decode("utf-8") == tok.decode(ids) == text
    # Control tokens stay out of the stream (llama.cpp's token_to_piece leaves them out too).
    chat = tok.encode("<|im_start|>assistant\nHi there<|im_start|>", special=True)
    stream = tok.streaming_decoder(prompt)
    streamed = b"".join([stream.push(t) for t in chat] + [stream.flush()]).decode("utf-8")
    assert streamed == "assistant\nHi there" and "<|im_start|>" in tok.decode(chat)


def test_sources_the_converter_cannot_export_fail_before_any_work(tiny_family_dirs, tiny_gemma3_dir, tmp_path):
    from edge_runtime.converters.to_tflite import convert_hf_to_tflite
    from edge_runtime.errors import InvalidConfigError, UnsupportedModelError

    def variant(src: Path, name: str, **changes) -> Path:
        folder = tmp_path / name
        shutil.copytree(src, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))
        return folder

    with pytest.raises(UnsupportedModelError) as err:
        convert_hf_to_tflite(variant(tiny_family_dirs["llama"], "falcon", architectures=["FalconForCausalLM"]),
                             tmp_path / "f.tflite")
    assert "FalconForCausalLM" in err.value.message and "Gemma3ForCausalLM" in (err.value.hint or "")
    # Gemma 3 beyond what litert-torch's decoder computes: refused, not exported wrong.
    for name, changes in {"softcap": {"final_logit_softcapping": 30.0},
                          "scalar": {"query_pre_attn_scalar": 144},
                          "scaled-rope": {"rope_parameters": {
                              "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}}.items():
        with pytest.raises(UnsupportedModelError):
            convert_hf_to_tflite(variant(tiny_gemma3_dir, name, **changes), tmp_path / "g.tflite")
    windowed = variant(tiny_family_dirs["mistral"], "mistral", sliding_window=64)
    with pytest.raises(InvalidConfigError) as err:
        convert_hf_to_tflite(windowed, tmp_path / "m.tflite", kv_cache_max_len=128)
    assert "window of 64" in err.value.message
    with pytest.raises(InvalidConfigError):
        convert_hf_to_tflite(tiny_family_dirs["llama"], tmp_path / "l.tflite", kv_cache_max_len=512)  # > 256
    with pytest.raises(InvalidConfigError):
        convert_hf_to_tflite(tiny_family_dirs["llama"], tmp_path / "l.tflite", quantize="int3")
    assert list(tmp_path.glob("*.tflite")) == [] and not list(tmp_path.glob(".*"))


def test_tied_weights_saved_under_the_head_name_are_the_embedding(tiny_llama_dir, tmp_path):
    # safetensors' save_model (converters/gguf_to_hf.py) keeps one name of a tied pair: lm_head.
    from safetensors.numpy import save_file

    from edge_runtime.converters.tflite_config import read_decoder_spec

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    save_file({"lm_head.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    spec = read_decoder_spec(tmp_path)
    assert spec.tie_word_embeddings and spec.embedding_from_head
    untied = read_decoder_spec(tiny_llama_dir)
    assert not untied.tie_word_embeddings and not untied.embedding_from_head
