"""ONNX: the converter (onnxruntime-genai's builder) and the backend, on the tiny Llama for real.

The tiny model is converted once per run to fp32, and to int8/int4 for the tests that need them.
Reference numbers come from ``transformers`` on the same folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime_genai", reason='needs the onnx extra: pip install "edge-runtime[onnx]"')
for _module in ("onnx", "onnx_ir", "onnxscript", "torch", "transformers"):
    pytest.importorskip(_module, reason='converting needs the convert extra: pip install "edge-runtime[convert]"')

import numpy as np

from edge_runtime.backends.base import SamplingParams, Settings
from edge_runtime.errors import (
    InvalidConfigError,
    InvalidModelFileError,
    UnsupportedModelError,
)

PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak."
TEXT = (PROMPT + "\nAll:\nSpeak, speak.\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
        "All:\nResolved. resolved.\nFirst Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def _convert(src: Path, folder: Path, precision: str) -> Path:
    from edge_runtime.converters.to_onnx import convert_hf_to_onnx, onnx_folder_name

    return convert_hf_to_onnx(src, folder / onnx_folder_name("tiny", precision), precision=precision).path


@pytest.fixture(scope="module")
def converted(tiny_llama_dir, tmp_path_factory):
    """``converted(precision)``: the tiny model in that precision, converted on first use."""
    root = tmp_path_factory.mktemp("onnx")
    done: dict[str, Path] = {}

    def get(precision: str) -> Path:
        if precision not in done:
            done[precision] = _convert(tiny_llama_dir, root, precision)
        return done[precision]

    return get


@pytest.fixture(scope="module")
def fp32_dir(converted) -> Path:
    return converted("fp32")


def load(path: Path, n_ctx: int = 256, n_parallel: int = 1):
    from edge_runtime.backends.onnx import OnnxBackend

    return OnnxBackend.load(str(path), Settings(n_ctx=n_ctx, n_threads=2, n_parallel=n_parallel))


@pytest.fixture(scope="module")
def fp32(fp32_dir):
    model = load(fp32_dir)
    yield model
    model.close()


@pytest.fixture(scope="module")
def hf(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


def run(model, tokens, params=GREEDY, cancel=None):
    events = list(model.generate(tokens, params, cancel=cancel))
    assert all(e.finish_reason is None for e in events[:-1]) and events[-1].finish_reason
    return [e.token for e in events if e.token is not None], "".join(e.text for e in events), events[-1]


def forced_logprobs(model, tokens: list[int]) -> np.ndarray:
    """Log-probabilities after each token, feeding the text one token at a time."""
    from edge_runtime.backends.onnx.native import GenaiSequence

    seq = GenaiSequence(model.og_model, model.info.n_ctx)
    rows = []
    for t in tokens:
        seq.append([t])
        rows.append(seq.last_logits())
    x = np.stack(rows).astype(np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


# -- the converter ---------------------------------------------------------------------------


def test_conversion_writes_a_complete_folder_with_the_chat_template(fp32_dir, tiny_llama_dir):
    from edge_runtime.models.artifact import artifact_from_onnx

    names = {p.name for p in fp32_dir.iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "edgert_onnx.json"} <= names
    template = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((fp32_dir / "tokenizer_config.json").read_text())["chat_template"] == template
    assert not [p for p in fp32_dir.parent.iterdir() if p.name.startswith(".")]  # no work folders left
    art = artifact_from_onnx(fp32_dir)
    assert (art.format, art.quant, art.arch, art.name, art.n_ctx_train) == ("onnx", "fp32", "llama", "tiny", 256)
    assert art.n_params == 229_824 and art.size_bytes == sum(p.stat().st_size for p in fp32_dir.iterdir())


def test_bad_requests_fail_before_the_builder_starts(tiny_llama_dir, tmp_path):
    from edge_runtime.converters.to_onnx import convert_hf_to_onnx

    with pytest.raises(InvalidConfigError, match="precision"):
        convert_hf_to_onnx(tiny_llama_dir, tmp_path / "x", precision="int3")
    odd = tmp_path / "odd"
    shutil.copytree(tiny_llama_dir, odd)
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM") as info:
        convert_hf_to_onnx(odd, tmp_path / "y")
    assert "LlamaForCausalLM" in info.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd"]


def test_an_interrupted_conversion_leaves_nothing_behind(tiny_llama_dir, tmp_path):
    from edge_runtime.converters.to_onnx import convert_hf_to_onnx

    def stop(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_onnx(tiny_llama_dir, tmp_path / "tiny-int4-onnx", precision="int4", progress=stop)
    assert list(tmp_path.iterdir()) == []


# -- the backend against transformers ----------------------------------------------------------


def test_tokenizer_matches_transformers(fp32, hf):
    _, tok = hf
    for text in (PROMPT, "Café déjà vu — 日本語 🚀🦙 3.14159", "  spaces\tand\nlines  "):
        assert fp32.tokenize(text, add_bos=True) == tok(text)["input_ids"]
    assert fp32.info.add_bos and fp32.info.bos_token == "<|begin_of_text|>"
    assert fp32.tokenize("<|im_start|>", special=True) == [tok.convert_tokens_to_ids("<|im_start|>")]
    assert len(fp32.tokenize("<|im_start|>", special=False)) > 1  # user text stays text
    ids = fp32.tokenize("Café 🚀 done", add_bos=False)
    assert fp32.detokenize(ids) == "Café 🚀 done"


def test_fp32_greedy_tokens_equal_transformers(fp32, hf):
    import torch

    model, tok = hf
    for prompt in (PROMPT, "To be, or not to be"):
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False,
                                 eos_token_id=sorted(fp32.stop_ids), pad_token_id=1)[0, len(ids):].tolist()
        expected = [t for t in out if t not in fp32.stop_ids]
        tokens, text, last = run(fp32, ids)
        assert tokens == expected
        assert text == tok.decode(tokens, skip_special_tokens=True)
        assert last.finish_reason == ("length" if len(tokens) == 24 else "stop")


def test_fp32_logits_equal_transformers(fp32, hf):
    import torch

    model, tok = hf
    ids = tok(TEXT)["input_ids"][:64]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1).double().numpy()
    assert np.abs(forced_logprobs(fp32, ids) - ref).max() < 1e-4  # measured 3e-6


@pytest.mark.parametrize("precision, max_kl, min_top1", [("int8", 0.01, 0.9), ("int4", 0.2, 0.4)])
def test_quantized_divergence_is_bounded(converted, fp32, precision, max_kl, min_top1):
    # Measured on this random model (flat next-token distributions, the worst case for
    # rounding): int8 mean KL 0.0003 nats, top-1 agreement 98%; int4 (block 32) 0.035, 60%.
    ids = fp32.tokenize(TEXT, add_bos=True)[:64]
    ref = forced_logprobs(fp32, ids)
    model = load(converted(precision))
    try:
        got = forced_logprobs(model, ids)
        assert model.info.quant == precision
        greedy_first = run(model, ids[:12], SamplingParams(max_tokens=1, temperature=0))[0]
    finally:
        model.close()
    kl = (np.exp(ref) * (ref - got)).sum(-1)
    assert kl.mean() < max_kl
    assert (ref.argmax(-1) == got.argmax(-1)).mean() >= min_top1
    if precision == "int8":
        assert greedy_first == run(fp32, ids[:12], SamplingParams(max_tokens=1, temperature=0))[0]


# -- a chat session (the semantics every backend shares: tests/contract/) ----------------------


def test_a_chat_session_uses_the_models_own_template(fp32, tiny_llama_dir):
    from edge_runtime.session import Session

    template = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert fp32.info.chat_template == template
    fp32.reset()
    session = Session(fp32, params=SamplingParams(max_tokens=8, temperature=0))
    list(session.send("Hello there"))
    list(session.send("And again"))
    assert session.last_turn is not None and session.last_turn.stats.cached_tokens > 0
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]


# -- folder checks, memory, probe --------------------------------------------------------------


@pytest.mark.parametrize("damage, message", [
    ("no_data", "model.onnx.data is missing"),
    ("short_data", "truncated"),
    ("no_config", "no genai_config.json"),
    ("no_tokenizer", "no tokenizer"),
    ("short_graph", "damaged"),
])
def test_damaged_folders_are_one_line_errors(fp32_dir, tmp_path, damage, message):
    bad = tmp_path / "bad-fp32-onnx"
    shutil.copytree(fp32_dir, bad)
    if damage == "no_data":
        (bad / "model.onnx.data").unlink()
    elif damage == "short_data":
        os.truncate(bad / "model.onnx.data", 1000)
    elif damage == "no_config":
        (bad / "genai_config.json").unlink()
    elif damage == "no_tokenizer":
        (bad / "tokenizer.json").unlink()
    else:
        os.truncate(bad / "model.onnx", 3000)
    with pytest.raises(InvalidModelFileError, match=message) as info:
        load(bad)
    assert "\n" not in info.value.message and info.value.hint


def test_memory_estimate_counts_weights_and_the_whole_kv_cache(fp32_dir):
    from edge_runtime.backends.onnx import estimate_memory

    est = estimate_memory(fp32_dir, n_ctx=128, n_parallel=2)
    data = (fp32_dir / "model.onnx.data").stat().st_size + (fp32_dir / "model.onnx").stat().st_size
    assert est.weights_bytes == int(data * 1.40)  # fp32: the files plus the prepacked MatMul weights
    assert est.kv_bytes == 2 * (2 * 2 * 16 * 2 * 128 * 4)  # slots × layers × kv heads × head × K,V × ctx × f32
    assert est.total_bytes == est.weights_bytes + est.kv_bytes + est.compute_bytes + est.overhead_bytes
    assert estimate_memory(fp32_dir, n_ctx=100_000).kv_bytes == 2 * 2 * 16 * 2 * 256 * 4  # capped at the model's


def test_probe_and_a_light_import():
    from edge_runtime.backends import probe

    avail = probe("onnx")
    assert avail.available and "CPU" in avail.devices and "onnxruntime" in avail.version
    code = ("import sys, edge_runtime.backends.onnx, edge_runtime.converters.to_onnx; "
            "sys.exit(any(m.split('.')[0] in ('onnxruntime', 'onnxruntime_genai', 'torch', 'onnx') "
            "for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_planner_picks_onnx_when_it_is_the_only_backend_for_the_artifact(fp32_dir):
    from edge_runtime.device.info import detect
    from edge_runtime.models.artifact import artifact_from_onnx
    from edge_runtime.planning.planner import PlanRequest, choose_plan
    from edge_runtime.planning.profiles import match_profile

    device = detect()
    plan = choose_plan([artifact_from_onnx(fp32_dir)], device, match_profile(device), PlanRequest(ctx=128))
    assert plan.backend == "onnx" and plan.settings.n_ctx == 128
    assert plan.memory.kv_bytes == 2 * 2 * 16 * 2 * 128 * 4


# -- the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convert_output(fp32_dir, tmp_path_factory) -> Path:
    """A convert output folder: manifest.json beside the ONNX folder."""
    from edge_runtime.models.artifact import artifact_from_onnx
    from edge_runtime.models.manifest import Manifest, ManifestArtifact, folder_sha256, write_manifest

    root = tmp_path_factory.mktemp("tiny-out")
    folder = root / fp32_dir.name
    shutil.copytree(fp32_dir, folder)
    art = artifact_from_onnx(folder)
    entry = ManifestArtifact(file=folder.name, format="onnx", quant=art.quant, size_bytes=art.size_bytes,
                             sha256=folder_sha256(folder), arch=art.arch, n_params=art.n_params,
                             n_ctx_train=art.n_ctx_train, role="base")
    write_manifest(root, Manifest(model="tiny", source={"name": "tiny"}, tools={}, artifacts=(entry,)))
    return root


def edgert(cmd, *args, stdin=None):
    return subprocess.run([*cmd, *args], check=False, input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_run_and_piped_chat_on_onnx(edgert_cmd, convert_output, fp32):
    prompt = fp32.tokenize(PROMPT, special=True, add_bos=True)
    expected = run(fp32, prompt, SamplingParams(max_tokens=8, temperature=0))[1]
    args = ("--model", str(convert_output), "--backend", "onnx", "--temp", "0", "--max-tokens", "8", "--threads", "2")
    res = edgert(edgert_cmd, "run", PROMPT, *args, "--stats")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert "prompt_tokens=" in res.stderr.splitlines()[-1]
    res = edgert(edgert_cmd, "chat", *args, stdin="Hello\nAgain\n")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr


def test_cli_run_on_a_bare_onnx_folder(edgert_cmd, fp32_dir):
    res = edgert(edgert_cmd, "run", PROMPT, "--model", str(fp32_dir), "--temp", "0", "--max-tokens", "4")
    assert res.returncode == 0, res.stderr
    res = edgert(edgert_cmd, "plan", "--model", str(fp32_dir), "--kv-cache-type", "q8_0")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "--kv-cache-type q8_0: onnx keeps its own KV cache" in res.stderr


def test_cli_damaged_onnx_folder_is_one_error_line(edgert_cmd, convert_output, tmp_path):
    bad = tmp_path / "out"
    shutil.copytree(convert_output, bad)
    onnx_dir = next(p for p in bad.iterdir() if p.is_dir())
    os.truncate(onnx_dir / "model.onnx.data", 1000)
    # The manifest's size check or our folder check: either way one line, no traceback.
    res = edgert(edgert_cmd, "run", "Hi", "--model", str(bad), "--backend", "onnx", "--max-tokens", "2")
    assert res.returncode == 1
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_an_onnx_graph_naming_a_tensor_in_bytes_that_are_not_text_is_one_error(fp32_dir, tmp_path):
    """fuzz_formats (seed 2): a flipped bit made a weight's name not UTF-8; onnxruntime-genai quoted
    it in its error, and Python could not decode the message (a UnicodeDecodeError escaped)."""
    bad = tmp_path / fp32_dir.name
    shutil.copytree(fp32_dir, bad)
    graph = bytearray((bad / "model.onnx").read_bytes())
    at = graph.index(b"up_proj.MatMul.weight") + len(b"up_proj.MatMul.")
    graph[at] |= 0x80  # "weight" -> "\xf7eight"
    (bad / "model.onnx").write_bytes(bytes(graph))
    with pytest.raises(InvalidModelFileError, match="the ONNX model is damaged"):
        load(bad)


# -- the embedded model (real weights) ---------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_onnx(request, smollm2_path) -> Path:
    """The embedded SmolLM2 GGUF converted to ONNX int8 (dequantized through transformers),
    cached under the pytest cache: the first run takes a few minutes."""
    from edge_runtime.converters.to_onnx import convert_hf_to_onnx

    pytest.importorskip("gguf")
    root = Path(request.config.cache.mkdir("edgert-onnx-smollm2-1"))
    folder = root / "smollm2-int8-onnx"
    if not (folder / "edgert_onnx.json").is_file():
        convert_hf_to_onnx(smollm2_path, folder, precision="int8")
    return folder


@pytest.mark.slow
def test_the_embedded_gguf_converts_and_agrees_with_llama_cpp(smollm2_onnx, smollm2):
    from edge_runtime.session import ChatFormatter

    model = load(smollm2_onnx, n_ctx=512)
    try:
        assert model.info.chat_template == smollm2.info.chat_template
        assert (model.info.bos_token, model.info.eos_token, model.info.add_bos) == ("<|im_start|>", "<|im_end|>", False)
        for text in ("In 2024, 12345 apples cost 3.50 €.", "Café déjà vu 🚀 日本語", "<|im_start|>user\nHi<|im_end|>"):
            for special in (True, False):
                assert model.tokenize(text, special=special) == smollm2.tokenize(text, special=special)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        prompt = ChatFormatter(model).tokens(messages)
        assert prompt == ChatFormatter(smollm2).tokens(messages)
        params = SamplingParams(max_tokens=12, temperature=0)
        smollm2.reset()
        # The ONNX weights are the GGUF's Q4_1 values requantized to int8: the same answer.
        assert run(model, prompt, params)[1] == run(smollm2, prompt, params)[1]
    finally:
        model.close()
