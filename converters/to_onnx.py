"""Hugging Face folder (or GGUF) → an ONNX decoder with KV cache, through onnxruntime-genai's builder.

The builder (``onnxruntime_genai.models.builder``, started through ``onnx_builder.py``, which
fixes how it reads Gemma 3 configs) runs in a child process: it loads
the whole checkpoint with torch, and its memory and any crash stay out of the caller. It writes
into a temporary folder beside the destination, which is checked, completed (chat template,
what we know about the artifact) and renamed into place: an interrupted conversion leaves no
half folder. Output: ``genai_config.json``, ``model.onnx`` + ``model.onnx.data``, the tokenizer
and ``edgert_onnx.json``; the folder is named ``<model>-<precision>-onnx`` by the caller
(``onnx_folder_name``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidConfigError, ModelLoadError, ModelNotFoundError, UnsupportedModelError
from edge_runtime.files import replace_folder
from edge_runtime.formats.onnx import SIDECAR, read_onnx_folder

Progress = Callable[[int, int], None]
__all__ = ["OnnxConversionResult", "convert_hf_to_onnx", "onnx_folder_name"]

PRECISIONS = ("fp32", "int8", "int4")
EXECUTION_PROVIDERS = ("cpu", "cuda")
# Text decoders the builder exports (its dispatch table, 0.18); Llama is what our tests cover.
ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
    "PhiForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "GraniteForCausalLM",
    "OlmoForCausalLM", "NemotronForCausalLM", "SmolLM3ForCausalLM",
)
_LAYER = re.compile(r"^Reading layer (\d+)")


@dataclass(frozen=True)
class OnnxConversionResult:
    """What a conversion wrote."""

    path: Path  # the ONNX folder
    precision: str
    size_bytes: int  # every file in the folder
    n_params: int
    n_ctx: int  # the longest sequence genai_config allows
    arch: str  # genai's model type, e.g. "llama"
    seconds: float
    notes: tuple[str, ...] = ()  # the builder's warnings (it may override choices for some models)


def onnx_folder_name(model: str, precision: str) -> str:
    """``<model>-<precision>-onnx``, as ARCHITECTURE.md ("Names users see") names ONNX artifacts."""
    return f"{model}-{precision}-onnx"


def convert_hf_to_onnx(src: str | Path, out_dir: str | Path, *, precision: str = "int4",
                       execution_provider: str = "cpu", progress: Progress | None = None) -> OnnxConversionResult:
    """Convert a Hugging Face folder (or a .gguf file) to the ONNX folder ``out_dir``, atomically.

    ``progress(done_steps, n_steps)`` follows the builder (embedding, each layer, head, saving).
    An existing ``out_dir`` is replaced only once the new folder is complete.
    """
    if precision not in PRECISIONS:
        raise InvalidConfigError(f"unknown ONNX precision {precision!r}", f"choose one of {', '.join(PRECISIONS)}")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise InvalidConfigError(f"unknown execution provider {execution_provider!r}",
                                 f"choose one of {', '.join(EXECUTION_PROVIDERS)}")
    started = time.perf_counter()
    source = Path(src).expanduser()
    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.work.", dir=out.parent) as work:
        if source.is_file() and source.suffix == ".gguf":
            from edge_runtime.converters.gguf_to_hf import hf_source_from_gguf

            source = hf_source_from_gguf(source, Path(work) / "hf").path
        hf_arch, n_layer, n_params = check_source(source)
        tmp = Path(work) / "onnx"
        notes = _run_builder(source, tmp, Path(work) / "cache", precision, execution_provider,
                             progress, n_layer)
        _keep_chat_template(source, tmp)
        _write_sidecar(tmp, precision=precision, execution_provider=execution_provider,
                       n_params=n_params, hf_architecture=hf_arch)
        folder = read_onnx_folder(tmp)  # the checks every load makes, before it goes into place
        tmp.chmod(0o755)
        replace_folder(tmp, out)
    return OnnxConversionResult(
        path=out, precision=precision, size_bytes=folder.size_bytes, n_params=n_params,
        n_ctx=folder.max_length, arch=folder.arch, seconds=time.perf_counter() - started, notes=notes,
    )


def check_source(src: Path) -> tuple[str, int, int]:
    """(architecture, layers, parameters) of a HF folder, checked before the builder starts."""
    from edge_runtime.converters.safetensors_source import find_shards, read_header

    if not src.is_dir() or not (src / "config.json").is_file():
        raise ModelNotFoundError(f"{src}: not a Hugging Face model folder (no config.json)",
                                 "point at a folder with config.json, *.safetensors and the tokenizer")
    try:
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        arch = str((config.get("architectures") or ["?"])[0])
        n_layer = int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers") or 0)
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidConfigError(f"{src / 'config.json'}: unreadable ({exc})") from None
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {arch!r} cannot be converted to ONNX",
                                    f"supported: {', '.join(sorted(ARCHITECTURES))}")
    if not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise ModelNotFoundError(f"{src}: no tokenizer (tokenizer.json or tokenizer.model)")
    seen: set[str] = set()
    n_params = 0
    for shard in find_shards(src):  # also checks every tensor's byte range against the file
        for ref in read_header(shard):
            if ref.name not in seen:
                seen.add(ref.name)
                n_params += ref.n_elements
    return arch, n_layer, n_params


def _run_builder(src: Path, out: Path, cache: Path, precision: str, provider: str,
                 progress: Progress | None, n_layer: int) -> tuple[str, ...]:
    """Run the builder in a child process; return its warnings, raise with its last words."""
    cmd = [sys.executable, "-m", "edge_runtime.converters.onnx_builder", "-i", str(src), "-o", str(out),
           "-p", precision, "-e", provider, "-c", str(cache),
           "--extra_options", "hf_token=false", "hf_remote=false"]
    # Offline always: a local folder needs nothing from the Hub, and nothing may be fetched.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    n_steps = n_layer + 4  # embedding, layers, final norm, LM head, saving
    tail: deque[str] = deque(maxlen=30)
    notes: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            encoding="utf-8", errors="replace", env=env)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            for line in raw.replace("\r", "\n").splitlines():
                line = line.strip()
                if not line:
                    continue
                tail.append(line)
                if line.startswith("WARNING") and "torch" not in line:
                    notes.append(line)
                if progress is not None:
                    step = _step(line, n_layer)
                    if step is not None:
                        progress(step, n_steps)
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        why = next((line for line in reversed(tail) if re.match(r"^\w*(Error|Exception)\b", line)), None)
        why = why or (tail[-1] if tail else f"exit status {proc.returncode}")
        raise ModelLoadError(f"the ONNX builder failed: {why}",
                             'check that the "convert" extra is installed: pip install "edge-runtime[convert]"')
    if progress is not None:
        progress(n_steps, n_steps)
    return tuple(notes)


def _step(line: str, n_layer: int) -> int | None:
    if line.startswith("Reading embedding"):
        return 1
    if m := _LAYER.match(line):
        return int(m.group(1)) + 2
    if line.startswith("Reading final norm"):
        return n_layer + 2
    if line.startswith("Reading LM head"):
        return n_layer + 3
    return None


def _keep_chat_template(src: Path, out: Path) -> None:
    """Put the source's chat template into the output's tokenizer_config.json.

    The builder saves the tokenizer through ``transformers``, which (v5) moves the template to
    chat_template.jinja; tokenizer_config.json is where the backend (and other runtimes) look.
    """
    template = None
    for folder in (src, out):
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            value = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
            template = template or (value if isinstance(value, (str, list)) and value else None)
        jinja = folder / "chat_template.jinja"
        if template is None and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
    target = out / "tokenizer_config.json"
    if template is None or not target.is_file():
        return
    config = json.loads(target.read_text(encoding="utf-8"))
    config["chat_template"] = template
    # ``out`` is the temporary folder renamed into place whole: a plain write inside it is atomic.
    target.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sidecar(out: Path, **fields: Any) -> None:
    """What the folder cannot say by itself: precision, parameters, how the graph keeps things."""
    import onnx

    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}
    past = [i for i in graph.input if i.name.startswith("past_key_values")]
    fields["kv_bytes"] = sizes.get(past[0].type.tensor_type.elem_type, 4) if past else 4
    # The memory estimate needs to know whether the embedding is the LM head's 4-bit weights.
    fields["embedding_quantized"] = any(n.op_type == "GatherBlockQuantized" for n in graph.node)
    # ``out`` is the temporary folder renamed into place whole: a plain write inside it is atomic.
    (out / SIDECAR).write_text(json.dumps(fields, indent=2) + "\n", encoding="utf-8")
