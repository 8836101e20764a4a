"""HF → GGUF conversion, GGUF as a source, and quantization, checked against real runtimes.

The reference is ``transformers`` itself (logits, greedy tokens, token ids); the converted files
are read back by real llama.cpp (llama-cpp-python as the harness, edge_runtime's backend for the
quant ladder). Tiny models come from ``tiny_models.py`` (cached under the pytest cache).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tiny_models import CHAT_TEMPLATE, PLAIN_ADDED_TOKEN

from edge_runtime.converters import registry
from edge_runtime.converters.hf_to_gguf import check_source, convert_hf_to_gguf, supported_architectures
from edge_runtime.converters.pretokenizers import CHECK_TEXT, CHECK_TEXT_SHA256
from edge_runtime.converters.quantize import quantize_gguf
from edge_runtime.errors import (
    InvalidConfigError,
    InvalidModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from edge_runtime.formats.gguf import read_gguf_header

TEXTS = [
    "Hello world", "  leading spaces and trailing  ", "   ", " ", "\n", "", "a\tb\r\nc",
    "Café déjà vu, naïve — “quoted” …", "日本語 中文 한국어 Привет Ελληνικά", "emoji 🚀🦙😁 👩‍💻 ✅",
    "digits 7 42 1234567 3.14159 2024-06-01", "new\n\nlines\n\n\n  indented\n", "I'm sure he'll say 'RE WE'VE",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    f"call {PLAIN_ADDED_TOKEN} now",
    "<|end_of_text|> after", "ROMEO: But soft, what light through yonder window breaks?",
]


def outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny_f32_gguf(tiny_llama_dir: Path, gguf_dir: Path):
    return convert_hf_to_gguf(tiny_llama_dir, gguf_dir / "tiny-f32.gguf", outtype="f32")


def llama_cpp_harness(path: Path, **kwargs):
    """llama-cpp-python's Llama as the reference harness (f32 KV cache: no f16 rounding)."""
    from llama_cpp import Llama

    return Llama(str(path), n_ctx=256, n_threads=2, verbose=False, type_k=0, type_v=0, **kwargs)


def hf_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# -- registry and tables ------------------------------------------------------------------------


def test_supported_architectures_and_unknown_one() -> None:
    supported = supported_architectures()
    assert {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM"} <= set(supported)
    with pytest.raises(UnsupportedModelError) as err:
        registry.converter_for("gguf", "GPTNeoXForCausalLM")
    assert "GPTNeoXForCausalLM" in err.value.message and "LlamaForCausalLM" in err.value.hint


def test_registry_table_and_decorators_agree() -> None:
    import importlib

    for fmt, modules in registry.MODULES.items():
        declared = set()
        for module in modules:
            mod = importlib.import_module(module)
            for obj in vars(mod).values():
                declared |= set(getattr(obj, "architectures", ()) if isinstance(obj, type) else ())
        assert declared == set(registry.supported_architectures(fmt))


def test_check_text_is_llama_cpps() -> None:
    assert hashlib.sha256(CHECK_TEXT.encode()).hexdigest() == CHECK_TEXT_SHA256


# -- fidelity against transformers ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma3"])
def test_f32_logits_and_greedy_match_transformers(family: str, tiny_family_dirs: dict[str, Path],
                                                  tiny_gemma3_dir: Path, gguf_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    tiny_llama_dir = tiny_gemma3_dir if family == "gemma3" else tiny_family_dirs[family]
    result = convert_hf_to_gguf(tiny_llama_dir, gguf_dir / f"{family}-logits-f32.gguf", outtype="f32")
    assert result.arch == {"mistral": "llama"}.get(family, family)
    ids = [1, 17, 300, 5, 99, 42, 7, 250, 31, 64, 77, 12, 8, 500]  # longer than Gemma's window of 4
    llm = llama_cpp_harness(result.path, logits_all=True)
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    ref = hf_logits(tiny_llama_dir, ids)
    # llama.cpp's CPU GELU (Gemma's FFN) reads an f16 lookup table: ~5e-4 relative error per
    # activation, ~1e-3 on these logits. Gemma's weights convert exactly all the same: with its FFN
    # switched off the logits agree to 1e-6, and a conversion mistake shows as errors of O(1).
    tolerance = 5e-3 if family == "gemma3" else 1e-3
    assert np.abs(got - ref).max() < tolerance

    import torch

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_greedy = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0][len(ids):].tolist()
    llm.reset()
    ours = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        ours.append(token)
        if len(ours) == len(hf_greedy):
            break
    assert ours == hf_greedy


def test_tokenizer_matches_transformers(tiny_llama_dir: Path, tiny_f32_gguf) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_llama_dir)
    llm = llama_cpp_harness(tiny_f32_gguf.path, vocab_only=True)
    assert tiny_f32_gguf.tokenizer_pre == "llama-bpe"
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text


@pytest.mark.parametrize("rules", ["smollm", "gpt2", "qwen2", "llama3"])
def test_pre_tokenizers_on_smollm2_vocab(rules: str, smollm2_vocab_dirs: dict[str, Path], gguf_dir: Path) -> None:
    """The real SmolLM2 vocabulary under each split rule llama.cpp implements."""
    from transformers import AutoTokenizer

    folder = smollm2_vocab_dirs[rules]
    result = convert_hf_to_gguf(folder, gguf_dir / f"vocab-{rules}.gguf", outtype="f16")
    expected = {"smollm": "smollm", "gpt2": "smollm", "qwen2": "qwen2", "llama3": "llama-bpe"}[rules]
    # smollm is found by llama.cpp's hash of the published tokenizer; gpt2's split gives the same
    # ids on this vocabulary (it has no multi-digit tokens), so its hash matches smollm's too.
    assert result.tokenizer_pre == expected
    hf = AutoTokenizer.from_pretrained(folder)
    llm = llama_cpp_harness(result.path, vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_sentencepiece_tokenizer(kind: str, spm_llama_dir: Path, tiny_gemma3_dir: Path, gguf_dir: Path) -> None:
    """tokenizer.model (Llama 2, Mistral, TinyLlama; Gemma without the "▁" prefix): llama.cpp's
    "llama" tokenizer gives the ids sentencepiece gives."""
    import sentencepiece as spm

    folder = spm_llama_dir if kind == "llama" else tiny_gemma3_dir
    result = convert_hf_to_gguf(folder, gguf_dir / f"spm-{kind}.gguf", outtype="f16")
    header = read_gguf_header(result.path)
    assert header.get("tokenizer.ggml.model") == "llama" and header.get("tokenizer.ggml.pre") == "default"
    assert header.get("tokenizer.ggml.add_space_prefix") is (kind == "llama")
    assert result.chat_template == CHAT_TEMPLATE
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    llm = llama_cpp_harness(result.path, vocab_only=True)
    plain = [t for t in TEXTS if "<|" not in t and PLAIN_ADDED_TOKEN not in t]
    for text in plain:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == [sp.bos_id(), *sp.encode(text)], text
    assert llm.tokenize(b"</s> x", add_bos=True, special=True)[:2] == [sp.bos_id(), sp.eos_id()]
    if kind == "gemma3":
        return
    pytest.importorskip("google.protobuf")  # transformers needs it to read a tokenizer.model
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(spm_llama_dir)
    # transformers' Llama tokenizer adds its "▁" prefix only when the text does not start with a
    # space, where sentencepiece (and llama.cpp) always add it: compare where both agree.
    for text in (t for t in plain if not t[:1].isspace()):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_f16_and_bf16_sources(dtype: str, tiny_llama_dtype_dirs: dict[str, Path], gguf_dir: Path) -> None:
    """Half-precision sources: lossless in their own type, exact logits once widened to f32."""
    from gguf import GGUFReader

    from edge_runtime.converters.safetensors_source import find_shards, read_header

    src = tiny_llama_dtype_dirs[dtype]
    same = convert_hf_to_gguf(src, gguf_dir / f"{dtype}-same.gguf", outtype=dtype)
    assert same.source_type == dtype.upper()
    gguf_embd = next(t for t in GGUFReader(same.path).tensors if t.name == "token_embd.weight")
    ref = next(r for s in find_shards(src) for r in read_header(s) if r.name == "model.embed_tokens.weight")
    with open(ref.shard, "rb") as fh:  # compare raw bits: numpy has no bfloat16
        fh.seek(ref.start)
        assert gguf_embd.data.tobytes() == fh.read(ref.nbytes)

    widened = convert_hf_to_gguf(src, gguf_dir / f"{dtype}-f32.gguf", outtype="f32")
    ids = [0, 17, 300, 5, 999, 42, 7]
    llm = llama_cpp_harness(widened.path, logits_all=True)
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - hf_logits(src, ids)).max() < 1e-3


def test_metadata_chat_template_and_types(tiny_llama_dir: Path, gguf_dir: Path) -> None:
    result = convert_hf_to_gguf(tiny_llama_dir, gguf_dir / "meta-f16.gguf", outtype="f16")
    header = read_gguf_header(result.path)
    assert header.chat_template == CHAT_TEMPLATE == result.chat_template
    assert header.get("tokenizer.ggml.model") == "gpt2" and header.get("tokenizer.ggml.pre") == "llama-bpe"
    assert header.get("tokenizer.ggml.add_bos_token") is True and header.get("tokenizer.ggml.add_eos_token") is False
    assert header.file_type_name == "F16" and header.architecture == "llama"
    types = {t.name: t.type_name for t in header.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_q.weight"] == "F16"
    info = check_source(tiny_llama_dir)
    assert result.n_params == info.n_params == header.n_params and result.n_tensors == len(header.tensors)
    assert result.source_sha256 == check_source_hash(tiny_llama_dir)


def check_source_hash(folder: Path) -> str:
    from edge_runtime.converters.safetensors_source import hash_files

    info = check_source(folder)
    return hash_files(info.files, folder)


def test_source_hash_covers_every_input(tiny_llama_dir: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    before = check_source_hash(copy)
    info = check_source(copy)
    assert {p.name for p in info.files} >= {"config.json", "tokenizer.json", "tokenizer_config.json",
                                            "generation_config.json", "model.safetensors.index.json"}
    gen = copy / "generation_config.json"
    gen.write_text(gen.read_text().replace("}", ', "temperature": 0.5}', 1))
    assert check_source_hash(copy) != before


# -- bad inputs ---------------------------------------------------------------------------------


def _break(kind: str, folder: Path) -> None:
    if kind == "unsupported architecture":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["architectures"] = ["GPTNeoXForCausalLM"]
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind == "missing tokenizer":
        (folder / "tokenizer.json").unlink()
    elif kind == "missing shard":
        sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    elif kind == "wrong tensor shape":
        from safetensors.numpy import load_file, save_file

        shard = next(s for s in sorted(folder.glob("model-*.safetensors")) if "model.norm.weight" in load_file(s))
        tensors = load_file(shard)
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1]
        save_file(tensors, str(shard), metadata={"format": "pt"})
    elif kind == "truncated shard":
        shard = sorted(folder.glob("model-*.safetensors"))[0]
        shard.write_bytes(shard.read_bytes()[:-100])
    elif kind == "no config":
        (folder / "config.json").unlink()
    elif kind == "unknown pre-tokenizer":
        tj = json.loads((folder / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = {"type": "Whitespace"}
        (folder / "tokenizer.json").write_text(json.dumps(tj))


@pytest.mark.parametrize("kind, error", [
    ("unsupported architecture", UnsupportedModelError),
    ("missing tokenizer", UnsupportedModelError),
    ("missing shard", InvalidModelFileError),
    ("wrong tensor shape", InvalidModelFileError),
    ("truncated shard", InvalidModelFileError),
    ("no config", ModelNotFoundError),
    ("unknown pre-tokenizer", UnsupportedModelError),
])
def test_bad_source_fails_before_writing(kind: str, error: type, tiny_llama_dir: Path, tmp_path: Path) -> None:
    src = shutil.copytree(tiny_llama_dir, tmp_path / "src")
    _break(kind, src)
    out = tmp_path / "out"
    with pytest.raises(error) as err:
        check_source(src)
    assert err.value.message
    with pytest.raises(error):
        convert_hf_to_gguf(src, out / "m.gguf")
    assert outputs(out) == []


def test_missing_folder_and_bad_outtype(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError):
        check_source(tmp_path / "nope")
    with pytest.raises(InvalidConfigError):
        convert_hf_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", outtype="q8")


# -- interruption leaves nothing behind ---------------------------------------------------------------


def test_failing_progress_callback_removes_partial_file(tiny_llama_dir: Path, tiny_f32_gguf, tmp_path: Path) -> None:
    calls = []

    def stop_midway(done: int, total: int) -> None:
        calls.append((done, total))
        if len(calls) == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_gguf(tiny_llama_dir, tmp_path / "m.gguf", progress=stop_midway)
    assert outputs(tmp_path) == []
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(tiny_f32_gguf.path, tmp_path / "q.gguf", "Q8_0", progress=stop_midway)
    assert outputs(tmp_path) == []


SIGINT_SCRIPT = """
import sys, time
from edge_runtime.converters.{module} import {func}

def slow(done, total):
    print("tick", flush=True)
    time.sleep(0.2)

{func}(sys.argv[1], sys.argv[2], {extra} progress=slow)
"""


@pytest.mark.parametrize("module, func, extra", [
    ("hf_to_gguf", "convert_hf_to_gguf", "outtype='f32',"),
    ("quantize", "quantize_gguf", "qtype='Q4_0',"),
])
def test_sigint_leaves_no_partial_file(module: str, func: str, extra: str, tiny_llama_dir: Path,
                                       tiny_f32_gguf, tmp_path: Path) -> None:
    src = tiny_llama_dir if module == "hf_to_gguf" else tiny_f32_gguf.path
    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent(SIGINT_SCRIPT.format(module=module, func=func, extra=extra))
    proc = subprocess.Popen([sys.executable, "-c", script, str(src), str(out / "m.gguf")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "tick"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert outputs(out) == []
