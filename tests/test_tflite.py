"""TFLite: the tiny Llama converted by litert-torch, run in LiteRT, against transformers.

Conversions take about a minute each here (torch export + the TFLite converter, in a child
process); their outputs are cached under the pytest cache, keyed by the converter's source and
litert-torch's version. The module is skipped, with the reason, where litert-torch or
ai-edge-litert is not installed; ``test_tflite_units.py`` covers what needs neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.backends.base import SamplingParams, Settings
from edge_runtime.errors import InvalidModelFileError

REPO = Path(__file__).resolve().parent.parent
KV_LEN = 128
PREFILL = (8, 32)
PROMPT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer "
          "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles")
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
MISSING = [m for m in ("litert_torch", "ai_edge_litert") if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(f"{' and '.join(MISSING)} not installed: pip install \"edge-runtime[tflite,convert]\"",
                allow_module_level=True)
# Measured on the tiny random Llama (hidden 64, 2 cores x86-64, ai-edge-litert 2.3.0): dynamic_int8
# keeps f32's first 9 greedy tokens of PROMPT (2 to 9 over four prompts), and picks f32's next
# token at 90-98% of the positions of f32's own 48-token continuations (teacher forcing).
INT8_SAME_FIRST_TOKENS = 5
INT8_MIN_AGREEMENT = 0.8


# -- conversions (cached) ------------------------------------------------------------------


def _converter_key(recipe: str) -> str:
    from importlib.metadata import version

    digest = hashlib.sha256(version("litert-torch").encode())
    for name in ("to_tflite.py", "tflite_config.py", "tflite_worker.py"):
        digest.update((REPO / "converters" / name).read_bytes())
    return f"{recipe}-{digest.hexdigest()[:12]}"


def _converted(request: pytest.FixtureRequest, src: Path, recipe: str, family: str = "llama") -> Path:
    from edge_runtime.converters.to_tflite import convert_hf_to_tflite, tflite_file_name

    root = Path(request.config.cache.mkdir("edgert-tflite"))
    done = root / f"{family}-{_converter_key(recipe)}"
    target = done / tflite_file_name("tiny", recipe)
    if target.is_file():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        result = convert_hf_to_tflite(src, tmp / target.name, quantize=recipe, prefill_lengths=PREFILL,
                                      kv_cache_max_len=KV_LEN)
        assert result.n_ctx == KV_LEN and result.prefill_lengths == PREFILL and result.arch == family
        with contextlib.suppress(OSError):  # another session finished first
            os.rename(tmp, done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def tflite_f32(request: pytest.FixtureRequest, tiny_llama_dir: Path) -> Path:
    return _converted(request, tiny_llama_dir, "none")


@pytest.fixture(scope="session")
def tflite_int8(request: pytest.FixtureRequest, tiny_llama_dir: Path) -> Path:
    return _converted(request, tiny_llama_dir, "dynamic_int8")


@pytest.fixture(scope="session")
def f32_model(tflite_f32: Path):
    from edge_runtime.backends.tflite import TfliteBackend

    model = TfliteBackend.load(str(tflite_f32), Settings(n_threads=2))
    yield model
    model.close()


def _tokens(events) -> list[int]:
    return [e.token for e in events if e.token is not None]


def _hf_greedy(src: Path, prompt: list[int], n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)
    new = out[0, len(prompt):].tolist()
    eos = model.generation_config.eos_token_id
    ends = set(eos if isinstance(eos, list) else [eos])
    return new[: next((i for i, t in enumerate(new) if t in ends), len(new))]


# -- the converter's output ----------------------------------------------------------------


def test_the_artifact_describes_itself(tflite_f32, tiny_llama_dir):
    from edge_runtime.backends.tflite import estimate_memory
    from edge_runtime.formats.tflite import read_tflite_layout
    from edge_runtime.models.artifact import artifact_from_tflite

    layout = read_tflite_layout(tflite_f32)
    assert set(layout.signatures) == {"prefill_8", "prefill_32", "decode"}
    assert (layout.kv_len, layout.n_layer, layout.kv_heads, layout.head_dim) == (KV_LEN, 2, 2, 16)
    art = artifact_from_tflite(tflite_f32)
    assert (art.format, art.quant, art.n_ctx_train, art.arch) == ("tflite", "f32", KV_LEN, "llama")
    assert art.n_params == 229_824 and art.name == "tiny"
    for name in ("tokenizer.json", "tokenizer_config.json", tflite_f32.name + ".json"):
        assert (tflite_f32.parent / name).is_file()
    est = estimate_memory(tflite_f32, n_ctx=KV_LEN)
    assert est.kv_bytes == 2 * layout.kv_bytes and est.total_bytes > tflite_f32.stat().st_size


def test_f32_greedy_tokens_equal_transformers(f32_model, tiny_llama_dir):
    prompt = f32_model.tokenize(PROMPT, add_bos=f32_model.info.add_bos)
    assert len(prompt) > PREFILL[-1]  # a full chunk, then a padded one
    ours = _tokens(f32_model.generate(prompt, GREEDY))
    assert ours == _hf_greedy(tiny_llama_dir, prompt, GREEDY.max_tokens)
    assert len(ours) >= 8


def test_qwen2_f32_greedy_tokens_equal_transformers(request, tiny_family_dirs):
    from edge_runtime.backends.tflite import TfliteBackend

    src = tiny_family_dirs["qwen2"]  # q/k/v projections with biases
    path = _converted(request, src, "none", family="qwen2")
    with TfliteBackend.load(str(path), Settings(n_threads=2)) as model:
        prompt = model.tokenize(PROMPT, add_bos=model.info.add_bos)
        assert model.info.arch == "qwen2"
        assert _tokens(model.generate(prompt, GREEDY)) == _hf_greedy(src, prompt, GREEDY.max_tokens)


def test_gemma3_f32_greedy_tokens_equal_transformers(request, tiny_gemma3_dir):
    from edge_runtime.backends.tflite import TfliteBackend

    # Sliding-window layers (a 4-token window), a full layer, q/k norms, (1 + w) norms, a scaled
    # embedding and a SentencePiece tokenizer the converter turns into tokenizer.json.
    path = _converted(request, tiny_gemma3_dir, "none", family="gemma3")
    with TfliteBackend.load(str(path), Settings(n_threads=2)) as model:
        prompt = model.tokenize(PROMPT, add_bos=model.info.add_bos)
        assert model.info.arch == "gemma3" and len(prompt) > PREFILL[-1]
        ours = _tokens(model.generate(prompt, GREEDY))
        assert ours == _hf_greedy(tiny_gemma3_dir, prompt, GREEDY.max_tokens) and len(ours) >= 8


def test_interpreter_engine_gives_the_same_tokens(tflite_f32, f32_model):
    # The classic Interpreter path is what tflite-runtime images run.
    from edge_runtime.backends.tflite.engine import InterpreterEngine

    prompt = f32_model.tokenize(PROMPT, add_bos=True)
    expected = _tokens(f32_model.generate(prompt, GREEDY))
    f32_model.reset()
    compiled = f32_model.engine
    f32_model.engine = InterpreterEngine(f32_model.layout, 2, "ai-edge-litert")
    try:
        assert _tokens(f32_model.generate(prompt, GREEDY)) == expected
    finally:
        f32_model.engine.close()
        f32_model.engine = compiled
        f32_model.reset()


def test_dynamic_int8_stays_close_to_f32(tflite_int8, f32_model):
    from edge_runtime.backends.tflite import TfliteBackend

    prompt = f32_model.tokenize(PROMPT, add_bos=True)
    with TfliteBackend.load(str(tflite_int8), Settings(n_threads=2)) as q8:
        assert q8.info.quant == "int8"
        reference = _tokens(f32_model.generate(prompt, GREEDY))
        got = _tokens(q8.generate(prompt, GREEDY))
        assert got[:INT8_SAME_FIRST_TOKENS] == reference[:INT8_SAME_FIRST_TOKENS]
        # Teacher-forced: the int8 model's next-token pick after each prefix of f32's text.
        text = prompt + reference
        start = len(prompt) - 1
        agree = 0
        for end in range(start, len(text) - 1):
            one = SamplingParams(max_tokens=1, temperature=0.0)
            agree += _tokens(q8.generate(text[: end + 1], one)) == _tokens(f32_model.generate(text[: end + 1], one))
        assert agree / (len(text) - 1 - start) >= INT8_MIN_AGREEMENT
        assert q8.tokenizer.n_vocab <= q8.info.n_vocab


def test_a_truncated_tflite_is_a_one_line_error(tflite_f32, tmp_path, edgert_cmd):
    from edge_runtime.backends.tflite import TfliteBackend

    data = tflite_f32.read_bytes()
    bad = tmp_path / "bad-f32.tflite"
    bad.write_bytes(data[: len(data) // 2])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tflite_f32.parent / name, tmp_path / name)
    with pytest.raises(InvalidModelFileError) as err:
        TfliteBackend.load(str(bad), Settings())
    assert "truncated" in err.value.message and "\n" not in err.value.message
    res = subprocess.run([*edgert_cmd, "run", "hi", "--model", str(bad), "--backend", "tflite"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2 and "Traceback" not in res.stderr


def test_packed_weights_are_cached_once_and_a_damaged_cache_is_rebuilt(tflite_f32, f32_model):
    from edge_runtime.backends.tflite import TfliteBackend

    cache = f32_model.engine.weight_cache
    assert cache is not None and cache.is_file() and cache.parent.parent.parent == Path(os.environ["EDGERT_HOME"])
    size = cache.stat().st_size
    prompt = f32_model.tokenize(PROMPT, add_bos=True)
    f32_model.reset()
    expected = _tokens(f32_model.generate(prompt, GREEDY))
    cache.write_bytes(b"not a weight cache")
    with TfliteBackend.load(str(tflite_f32), Settings(n_threads=2)) as model:
        assert _tokens(model.generate(prompt, GREEDY)) == expected
    same_file = cache.name.rsplit("-", 1)[0] + "-*"  # this path's caches, whatever version
    assert cache.stat().st_size == size and len(list(cache.parent.glob(same_file))) == 1


def test_a_missing_runtime_names_the_extra(tflite_f32, monkeypatch):
    from edge_runtime import backends
    from edge_runtime.backends.tflite import TfliteBackend
    from edge_runtime.backends.tflite import engine as tflite_engine
    from edge_runtime.backends.tflite import model as tflite_model
    from edge_runtime.errors import BackendUnavailableError

    def nothing_installed():
        raise ImportError("neither ai-edge-litert nor tflite-runtime is installed")

    monkeypatch.setattr(tflite_engine, "find_runtime", nothing_installed)
    monkeypatch.setattr(tflite_model, "find_runtime", nothing_installed)
    availability = backends.probe("tflite")
    assert not availability.available and availability.install_hint == 'pip install "edge-runtime[tflite]"'
    with pytest.raises(BackendUnavailableError) as err:
        TfliteBackend.load(str(tflite_f32), Settings())
    assert err.value.hint == 'pip install "edge-runtime[tflite]"' and "\n" not in err.value.message


def test_damaged_tables_are_invalid_files_never_crashes(tflite_f32, tmp_path):
    from edge_runtime.formats.tflite import read_tflite_layout

    data = bytearray(tflite_f32.read_bytes())
    rng = np.random.default_rng(0)
    bad = tmp_path / "damaged.tflite"
    # The signature, tensor and metadata tables sit at the end of the file and the root at its start.
    spots = np.concatenate([rng.integers(len(data) - 4096, len(data), 300), rng.integers(0, 64, 100)])
    for spot in spots:
        damaged = bytearray(data)
        damaged[spot] ^= 0xFF
        bad.write_bytes(damaged)
        with contextlib.suppress(InvalidModelFileError):  # refusing is fine; anything else is not
            read_tflite_layout(bad)


# -- through the CLI -----------------------------------------------------------------------


def _convert_folder(tflite: Path, folder: Path) -> Path:
    """A convert-style folder (manifest + artifact + tokenizer) holding one TFLite artifact."""
    from edge_runtime.files import file_sha256
    from edge_runtime.models.artifact import artifact_from_tflite
    from edge_runtime.models.manifest import Manifest, ManifestArtifact, write_manifest

    folder.mkdir()
    for path in tflite.parent.iterdir():
        shutil.copy(path, folder / path.name)
    art = artifact_from_tflite(folder / tflite.name)
    entry = ManifestArtifact(file=tflite.name, format="tflite", quant=art.quant, size_bytes=art.size_bytes,
                             sha256=file_sha256(folder / tflite.name), arch=art.arch, n_params=art.n_params,
                             n_ctx_train=art.n_ctx_train, role="base")
    write_manifest(folder, Manifest(model="tiny", source={"kind": "hf"}, tools={}, artifacts=(entry,)))
    return folder


def test_cli_run_and_piped_chat_on_a_convert_folder(tflite_f32, f32_model, tmp_path, edgert_cmd):
    folder = _convert_folder(tflite_f32, tmp_path / "tiny")
    args = ["--model", str(folder), "--backend", "tflite", "--temp", "0", "--max-tokens", "12", "--threads", "2"]
    res = subprocess.run([*edgert_cmd, "run", PROMPT, *args, "--json"], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    prompt = f32_model.tokenize(PROMPT, special=True, add_bos=True)
    expected = f32_model.detokenize(_tokens(f32_model.generate(prompt, SamplingParams(max_tokens=12, temperature=0))))
    assert doc["text"] == expected and doc["stats"]["prompt_tokens"] == len(prompt)
    chat = subprocess.run([*edgert_cmd, "chat", *args, "--stats"], input="Hello there\nAnd again\n",
                          capture_output=True, text=True, timeout=180)
    assert chat.returncode == 0, chat.stderr
    stats = [line for line in chat.stderr.splitlines() if line.startswith("ttft_ms=")]
    assert len(stats) == 2 and chat.stdout.strip()


def test_cli_run_on_a_tflite_file(tflite_f32, f32_model, edgert_cmd):
    from edge_runtime.models.spec import find_artifacts

    found = find_artifacts(str(tflite_f32))
    assert found[0].format == "tflite" and found[0].n_ctx_train == KV_LEN
    res = subprocess.run([*edgert_cmd, "run", PROMPT, "--model", str(tflite_f32), "--backend", "tflite",
                          "--temp", "0", "--max-tokens", "8", "--threads", "2", "--stats"],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    prompt = f32_model.tokenize(PROMPT, special=True, add_bos=True)
    f32_model.reset()
    expected = "".join(e.text for e in f32_model.generate(prompt, SamplingParams(max_tokens=8, temperature=0)))
    assert res.stdout == expected + "\n"
    # stderr carries the stats line and nothing else: LiteRT's own logging is held back.
    assert res.stderr.strip().splitlines()[-1].startswith("ttft_ms=") and len(res.stderr.strip().splitlines()) == 1
