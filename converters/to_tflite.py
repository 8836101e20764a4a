"""Hugging Face folder → TFLite (LiteRT) decoder with an external KV cache, through litert-torch.

The decoder is rebuilt from ``config.json`` and the safetensors weights with
``litert_torch.generative`` (``tflite_config`` maps each family's config) and exported with
``prefill_<N>`` signatures at several lengths, a ``decode`` signature and the KV cache as inputs
and outputs (names in ``edge_runtime.formats.tflite``). Recipes (litert-torch's):

====================== ======= =========================================================
recipe                 type    what it does
====================== ======= =========================================================
none                   f32     float32 weights and compute
fp16                   fp16    float16 weights, float32 compute
dynamic_int8           int8    int8 weights per channel, int8 activations at run time
weight_only_int8       int8-wo int8 weights dequantized to float32 at run time
dynamic_int4_block32   int4    int4 weights in blocks of 32, int8 activations
====================== ======= =========================================================

The conversion runs in a child process (``tflite_worker``): torch export and the TFLite
converter hold gigabytes and can abort, and neither should happen to the caller. It writes into
a temporary folder beside the destination; the file is renamed into place at the end, with the
tokenizer (``tokenizer.json``, ``tokenizer_config.json`` carrying the chat template) and a
``<file>.json`` description of the artifact beside it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.converters.tflite_config import DecoderSpec, read_decoder_spec, shard_paths
from edge_runtime.converters.worker_process import follow_worker
from edge_runtime.errors import (
    InvalidConfigError,
    InvalidModelFileError,
    ModelLoadError,
)
from edge_runtime.files import atomic_write
from edge_runtime.formats.tflite import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    read_tflite_layout,
    sidecar_path,
)
from edge_runtime.models.artifact import artifact_from_tflite
from edge_runtime.models.manifest import ManifestArtifact

__all__ = [
    "QUANT_RECIPES",
    "TfliteConversionResult",
    "convert_hf_to_tflite",
    "recipe_for_type",
    "tflite_file_name",
    "tflite_manifest_entry",
]

Progress = Callable[[int, int], None]  # (steps done, steps in all)

# recipe -> the type name used in file names, manifests and the profiles' quant ladders
QUANT_RECIPES: dict[str, str] = {
    "none": "f32",
    "fp16": "fp16",
    "dynamic_int8": "int8",
    "weight_only_int8": "int8-wo",
    "dynamic_int4_block32": "int4",
}
DEFAULT_PREFILL_LENGTHS = (8, 64, 256)


@dataclass(frozen=True)
class TfliteConversionResult:
    """What one conversion wrote."""

    path: Path
    quantize: str  # the litert-torch recipe
    quant: str  # its type name (QUANT_RECIPES)
    size_bytes: int
    n_params: int
    n_ctx: int  # = kv_cache_max_len: the exported cache is the model's whole context
    prefill_lengths: tuple[int, ...]
    arch: str  # HF model_type ("llama", "qwen2")
    seconds: float


def recipe_for_type(name: str) -> str:
    """The recipe for a type name (``int8`` → ``dynamic_int8``); recipes pass through."""
    key = name.lower()
    if key in QUANT_RECIPES:
        return key
    for recipe, type_name in QUANT_RECIPES.items():
        if type_name == key:
            return recipe
    known = ", ".join(f"{t} ({r})" for r, t in QUANT_RECIPES.items())
    raise InvalidConfigError(f"unknown TFLite quantization {name!r}", f"choose one of: {known}")


def tflite_file_name(model: str, quantize: str) -> str:
    """``<model>-<type>.tflite`` as ARCHITECTURE.md ("Names users see") names artifacts."""
    return f"{model}-{QUANT_RECIPES[recipe_for_type(quantize)]}.tflite"


def convert_hf_to_tflite(
    src: Path,
    out: Path,
    *,
    quantize: str = "dynamic_int8",
    prefill_lengths: tuple[int, ...] = DEFAULT_PREFILL_LENGTHS,
    kv_cache_max_len: int = 1024,
    progress: Progress | None = None,
    threads: int | None = None,
) -> TfliteConversionResult:
    """Convert the Hugging Face folder ``src`` to the .tflite file ``out`` (atomically).

    ``kv_cache_max_len`` is the context the runtime will have: positions past it do not exist.
    Prefill lengths longer than the cache are dropped; at least one must remain.
    """
    started = time.perf_counter()
    recipe = recipe_for_type(quantize)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    spec = read_decoder_spec(src)  # unsupported or broken sources fail here, before the worker
    lengths = _check_lengths(prefill_lengths, kv_cache_max_len, spec)
    tokenizer_files = _tokenizer_files(src)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        request = {"src": str(src), "shards": [str(p) for p in shard_paths(src)], "spec": spec.to_dict(),
                   "out_dir": str(work), "quantize": recipe, "prefill_lengths": list(lengths),
                   "kv_cache_max_len": kv_cache_max_len, "threads": threads}
        written = Path(_run_worker(request, progress, total_steps=2 * (len(lengths) + 1) + 4))
        read_tflite_layout(written)  # what the runtime will check, before the file appears
        _write_companions(out, tokenizer_files, spec, recipe, lengths, kv_cache_max_len, src)
        with open(written, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(written, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return TfliteConversionResult(
        path=out, quantize=recipe, quant=QUANT_RECIPES[recipe], size_bytes=out.stat().st_size,
        n_params=spec.n_params, n_ctx=kv_cache_max_len, prefill_lengths=lengths, arch=spec.model_type,
        seconds=time.perf_counter() - started,
    )


def tflite_manifest_entry(path: Path, *, role: str, profiles: tuple[str, ...] = (),
                          build: dict[str, Any] | None = None) -> ManifestArtifact:
    """A manifest entry for a finished .tflite file (read from the file and its description, hashed)."""
    from edge_runtime.files import file_sha256

    art = artifact_from_tflite(path)
    return ManifestArtifact(
        file=Path(path).name, format="tflite", quant=art.quant, size_bytes=art.size_bytes,
        sha256=file_sha256(Path(path)), arch=art.arch, n_params=art.n_params, n_ctx_train=art.n_ctx_train,
        role=role, profiles=profiles, build=dict(build or {}),
    )


def _check_lengths(prefill_lengths: tuple[int, ...], kv_len: int, spec: DecoderSpec) -> tuple[int, ...]:
    if kv_len < 2:
        raise InvalidConfigError(f"kv_cache_max_len must be at least 2 (got {kv_len})")
    if kv_len > spec.max_position_embeddings:
        raise InvalidConfigError(
            f"kv_cache_max_len {kv_len} exceeds the model's context of {spec.max_position_embeddings} tokens",
            f"use at most {spec.max_position_embeddings}")
    if spec.sliding_window and not spec.gemma3 and kv_len > spec.sliding_window:
        raise InvalidConfigError(
            f"{spec.architecture} attends to a window of {spec.sliding_window} tokens; this converter exports "
            f"plain causal attention, exact only up to kv_cache_max_len {spec.sliding_window}",
            f"use kv_cache_max_len {spec.sliding_window} or less, or the GGUF format")
    lengths = tuple(sorted({int(n) for n in prefill_lengths if 0 < int(n) < kv_len}))
    if not lengths:
        raise InvalidConfigError(f"no prefill length below the KV cache size {kv_len} (got {list(prefill_lengths)})",
                                 "give lengths such as 8,64,256")
    return lengths


def _tokenizer_files(src: Path) -> tuple[bytes, dict[str, Any], dict[str, Any]]:
    """tokenizer.json bytes, tokenizer_config.json (chat template folded in), generation config."""
    tok = src / TOKENIZER_FILE
    if tok.is_file():
        tokenizer = tok.read_bytes()
    elif (src / "tokenizer.model").is_file():
        tokenizer = _fast_tokenizer_from_sentencepiece(src)
    else:
        raise InvalidModelFileError(f"{src}: no {TOKENIZER_FILE}",
                                    "the TFLite backend reads tokenizer.json; save a fast tokenizer")
    config_path = src / TOKENIZER_CONFIG_FILE
    config = _read_json(config_path) if config_path.is_file() else {}
    jinja = src / "chat_template.jinja"  # transformers 5 keeps the template here instead
    if not config.get("chat_template") and jinja.is_file():
        config["chat_template"] = jinja.read_text(encoding="utf-8")
    generation = _read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    model_config = _read_json(src / "config.json")
    for key in ("bos_token_id", "eos_token_id"):
        generation.setdefault(key, model_config.get(key))
    return tokenizer, config, generation


def _fast_tokenizer_from_sentencepiece(src: Path) -> bytes:
    """tokenizer.json made by transformers from a SentencePiece ``tokenizer.model`` (as Gemma ships)."""
    try:
        from transformers import AutoTokenizer

        fast = AutoTokenizer.from_pretrained(str(src))
        return fast.backend_tokenizer.to_str().encode("utf-8")
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModelFileError(
            f"{src}: no {TOKENIZER_FILE}, and tokenizer.model could not be converted ({first})",
            "save a fast tokenizer (tokenizer.json) beside the weights") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFileError(f"{path}: unreadable ({exc})") from None
    return data if isinstance(data, dict) else {}


def _write_companions(out: Path, tokenizer: tuple[bytes, dict[str, Any], dict[str, Any]], spec: DecoderSpec,
                      recipe: str, lengths: tuple[int, ...], kv_len: int, src: Path) -> None:
    from importlib.metadata import version

    tok_bytes, tok_config, generation = tokenizer
    atomic_write(out.parent / TOKENIZER_FILE, tok_bytes)
    atomic_write(out.parent / TOKENIZER_CONFIG_FILE, json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")
    eos = generation.get("eos_token_id")
    description = {
        "format": "tflite", "recipe": recipe, "quant": QUANT_RECIPES[recipe], "arch": spec.model_type,
        "hf_architecture": spec.architecture, "n_params": spec.n_params, "n_ctx": kv_len,
        "prefill_lengths": list(lengths), "bos_token_id": generation.get("bos_token_id"),
        "eos_token_ids": sorted({int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}),
        "source": src.name, "tools": {"litert_torch": version("litert-torch")},
    }
    atomic_write(sidecar_path(out), json.dumps(description, indent=2) + "\n")


def _run_worker(request: dict[str, Any], progress: Progress | None, total_steps: int) -> str:
    """Run the child and follow its progress; return the file it wrote, raise on failure."""
    result: dict[str, str] = {}
    done = 0

    def on_message(msg: dict[str, Any]) -> None:
        nonlocal done
        if "file" in msg or "error" in msg:
            result.update({k: str(v) for k, v in msg.items()})
        elif _is_step(str(msg.get("log", ""))):
            done += 1
            if progress is not None:
                progress(min(done, total_steps - 1), total_steps)

    returncode, tail = follow_worker("edge_runtime.converters.tflite_worker", request, on_message)
    file, error = result.get("file"), result.get("error")
    if returncode != 0 or file is None:
        why = error or (tail.splitlines()[-1] if tail else f"the converter exited with status {returncode}")
        if returncode < 0 and not error:
            why = f"the converter was killed by signal {-returncode} (out of memory?)"
        raise ModelLoadError(f"converting to TFLite ({request['quantize']}) failed: {why}")
    if progress is not None:
        progress(total_steps, total_steps)
    return file


def _is_step(line: str) -> bool:
    # litert-torch logs "(mm:ss) [ DONE] LiteRT-Torch Convert > <step> (+mm:ss)" for each step
    # (export and lowering per signature, FX passes, merging, converter passes); deeper levels
    # ("> step > detail") are parts of those.
    if "[ DONE]" not in line:
        return False
    return line.count(" > ") == 1 or line.count(">") == 0
