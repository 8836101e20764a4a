"""ONNX for Gemma 3: the builder's Gemma 3 class on a transformers 5 config (RoPE nested per layer
type), sliding-window layers that need a cache at least the window long, against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai", reason='needs the onnx extra: pip install "edge-runtime[onnx]"')
for _module in ("onnx", "onnx_ir", "onnxscript", "torch", "transformers"):
    pytest.importorskip(_module, reason='converting needs the convert extra: pip install "edge-runtime[convert]"')

from edge_runtime.backends.base import SamplingParams, Settings

PROMPT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings "
          "and arrows of outrageous fortune")


@pytest.fixture(scope="module")
def gemma3_fp32(tiny_gemma3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_runtime.converters.to_onnx import convert_hf_to_onnx, onnx_folder_name

    out = tmp_path_factory.mktemp("onnx-gemma3") / onnx_folder_name("tiny-gemma3", "fp32")
    return convert_hf_to_onnx(tiny_gemma3_dir, out, precision="fp32").path


def test_gemma3_fp32_greedy_tokens_equal_transformers(gemma3_fp32, tiny_gemma3_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from edge_runtime.backends.onnx import OnnxBackend
    from edge_runtime.formats.onnx import read_onnx_folder

    folder = read_onnx_folder(gemma3_fp32)
    assert folder.arch == "gemma3_text" and folder.sliding_window == 4
    # A context below the window still gets a cache the window long (genai refuses less).
    assert folder.cache_positions(2) == 4 and folder.cache_positions(64) == 64
    with OnnxBackend.load(str(gemma3_fp32), Settings(n_ctx=128, n_threads=2)) as model:
        prompt = model.tokenize(PROMPT, add_bos=model.info.add_bos)
        assert len(prompt) > 3 * folder.sliding_window
        ours = [e.token for e in model.generate(prompt, SamplingParams(max_tokens=24, temperature=0))
                if e.token is not None]
    hf = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    theirs = out[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos])
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in ends), len(theirs))]
    assert ours == theirs and len(ours) >= 8
