"""Quantizing a float GGUF with llama.cpp's quantizer: every ladder rung loads and generates,
fallbacks are reported, unusable types and damaged files fail before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import CHAT_TEMPLATE

from edge_runtime.converters.gguf_source import convert_to_gguf
from edge_runtime.converters.hf_to_gguf import convert_hf_to_gguf
from edge_runtime.converters.quantize import QUANT_TYPES, quantize_gguf
from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError
from edge_runtime.formats.gguf import read_gguf_header

# Every ladder rung the profiles name, and the float types.
LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_0", "Q4_K_M", "Q4_0", "Q4_1", "IQ4_NL", "Q3_K_M", "Q2_K", "F16", "BF16", "F32"]


def outputs(folder: Path) -> list[str]:
    """What a folder holds, temporary files included (nothing partial may be left)."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def tiny_f32_gguf(tiny_llama_dir: Path, gguf_dir: Path):
    return convert_hf_to_gguf(tiny_llama_dir, gguf_dir / "tiny-f32.gguf", outtype="f32")


@pytest.fixture(scope="module")
def tiny_256_gguf(tiny_llama_256_dir: Path, gguf_dir: Path) -> Path:
    return convert_hf_to_gguf(tiny_llama_256_dir, gguf_dir / "tiny256-f16.gguf", outtype="f16").path


def _loads_and_generates(path: Path) -> None:
    from edge_runtime.backends.base import SamplingParams, Settings
    from edge_runtime.backends.llamacpp.model import LlamaCppModel

    model = LlamaCppModel(str(path), Settings(n_ctx=256, n_threads=2))
    try:
        prompt = model.tokenize("ROMEO: But soft", add_bos=True)
        events = list(model.generate(prompt, SamplingParams(max_tokens=6, temperature=0)))
        assert events[-1].finish_reason in ("length", "stop")
        assert sum(e.token is not None for e in events) >= 1
    finally:
        model.close()


@pytest.mark.parametrize("qtype", LADDER)
def test_every_quant_type_loads_and_generates(qtype: str, tiny_256_gguf: Path, gguf_dir: Path) -> None:
    result = quantize_gguf(tiny_256_gguf, gguf_dir / f"tiny256-{qtype}.gguf", qtype, threads=2)
    assert result.qtype == qtype and result.fallbacks == [] and not result.source_quantized
    assert read_gguf_header(result.path).file_type_name == qtype
    assert result.size_bytes == result.path.stat().st_size
    _loads_and_generates(result.path)


def test_fallbacks_are_reported(tiny_f32_gguf, tmp_path: Path) -> None:
    """hidden 64 rows do not fit k-quant blocks of 256: llama.cpp falls back, and we say so."""
    result = quantize_gguf(tiny_f32_gguf.path, tmp_path / "k.gguf", "q4_k_m", threads=2)
    assert result.fallbacks and all("->" in f and "256" in f for f in result.fallbacks)
    assert any(f.startswith("blk.0.attn_q.weight: q4_K -> ") for f in result.fallbacks)
    _loads_and_generates(result.path)


@pytest.mark.parametrize("qtype, hint", [("IQ2_XXS", "imatrix"), ("Q9_9", "choose from")])
def test_unusable_types_fail_before_writing(qtype: str, hint: str, tiny_f32_gguf, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError) as err:
        quantize_gguf(tiny_f32_gguf.path, tmp_path / "x.gguf", qtype)
    assert hint in f"{err.value.message} {err.value.hint}"
    assert outputs(tmp_path) == []
    assert set(LADDER) <= set(QUANT_TYPES)


def test_quantize_rejects_damaged_gguf(tiny_f32_gguf, tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_f32_gguf.path.read_bytes()[:5000])
    with pytest.raises(EdgeRuntimeError):
        quantize_gguf(bad, tmp_path / "q.gguf", "Q8_0")
    assert outputs(tmp_path) == ["bad.gguf"]


# -- GGUF as a source ---------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_requantize_embedded_smollm2(qtype: str, smollm2_path: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfigError):  # quality would drop twice: only when asked
        quantize_gguf(smollm2_path, tmp_path / "q.gguf", qtype)
    result = quantize_gguf(smollm2_path, tmp_path / "q.gguf", qtype, allow_requantize=True)
    assert result.source_quantized and result.source_type == "Q4_1"
    _loads_and_generates(result.path)


def test_gguf_source_to_float_records_quantized_source(tiny_f32_gguf, tmp_path: Path) -> None:
    q8 = quantize_gguf(tiny_f32_gguf.path, tmp_path / "q8.gguf", "Q8_0")
    result = convert_to_gguf(q8.path, tmp_path / "back-f16.gguf", outtype="f16")
    assert result.source_quantized and result.source_type == "Q8_0" and result.hf_architecture is None
    assert result.chat_template == CHAT_TEMPLATE and result.arch == "llama"
    assert read_gguf_header(result.path).file_type_name == "F16"
    assert sorted(os.listdir(tmp_path)) == ["back-f16.gguf", "q8.gguf"]
    _loads_and_generates(result.path)
