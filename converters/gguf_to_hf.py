"""A GGUF file → a Hugging Face folder (float32 safetensors, config, tokenizer, chat template).

The TFLite and ONNX converters start from a Hugging Face folder; a GGUF (such as the embedded
SmolLM2, Q4_1) becomes one through ``transformers``' own GGUF loader, which dequantizes every
tensor. The folder therefore carries the source's quantization error: converting it back to a
float format gives the GGUF's values, not the original checkpoint's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import InvalidConfigError, InvalidModelFileError, ModelNotFoundError, UnsupportedModelError

# llama.cpp pre-tokenizer names whose published tokenizers split digits individually before the
# byte-level split (SmolLM, SmolLM2).
DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm",)


@dataclass(frozen=True)
class HFSource:
    """What ``hf_source_from_gguf`` wrote."""

    path: Path  # the Hugging Face folder
    architecture: str  # e.g. "LlamaForCausalLM"
    n_params: int
    source_type: str | None  # the GGUF's own weight type, e.g. "Q4_1"
    chat_template: str | None
    seconds: float


def hf_source_from_gguf(gguf_path: str | Path, out_dir: str | Path) -> HFSource:
    """Dequantize a GGUF through ``transformers`` and save it as a Hugging Face folder, atomically.

    ``out_dir`` must not exist yet; the folder is written beside it under a temporary name and
    renamed into place, so an interrupted run leaves nothing behind. Needs torch, transformers
    and gguf (the ``convert`` extra).
    """
    from edge_runtime.formats.gguf import describe_gguf

    started = time.perf_counter()
    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelNotFoundError(f"{src}: no such file")
    info = describe_gguf(src)  # our bounds-checked header read: a bad file fails here, cheaply
    out = Path(out_dir).expanduser()
    if out.exists():
        raise InvalidConfigError(f"{out} already exists", "remove it, or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        architecture, n_params, template = _save_dequantized(src, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return HFSource(out, architecture, n_params, info.quant, template, time.perf_counter() - started)


def _save_dequantized(src: Path, folder: Path) -> tuple[str, int, str | None]:
    from edge_runtime.quiet import quiet_native_stderr

    # torch, torchao and transformers print import warnings and progress bars: not for the user.
    with quiet_native_stderr():
        import torch
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        with quiet_native_stderr():
            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as exc:
        # transformers names what it cannot read (an architecture or a tensor type) in the text.
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"{src.name}: transformers cannot load this GGUF: {why}",
                                    "convert from the original Hugging Face folder instead") from exc
    config = model.config
    # A GGUF-loaded model remembers its quantizer and refuses save_pretrained; the weights are
    # plain float32 tensors by now, so the config is written without that record.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    # save_model writes tied tensors (embeddings = LM head) once, as save_pretrained would.
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    _restore_pre_tokenizer(folder, src)
    template = _keep_chat_template(folder, getattr(tokenizer, "chat_template", None))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    return config.architectures[0], int(n_params), template


def _restore_pre_tokenizer(folder: Path, src: Path) -> None:
    """Put back the digit split transformers' GGUF reader drops for some pre-tokenizers.

    llama.cpp names the pre-tokenizer (``tokenizer.ggml.pre``) and re-implements it; transformers
    rebuilds a plain byte-level one. For the names listed here the published tokenizer.json
    splits digits one by one first, so without this, numbers would tokenize differently from
    llama.cpp running the same GGUF.
    """
    from edge_runtime.formats.gguf import read_gguf_header

    pre = read_gguf_header(src).get("tokenizer.ggml.pre")
    if pre not in DIGIT_SPLIT_PRE_TOKENIZERS:
        return
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    current = data.get("pre_tokenizer") or {}
    if current.get("type") != "ByteLevel":
        return  # already a sequence (or something we do not know): leave it alone
    digits = {"type": "Digits", "individual_digits": True}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [digits, current]}
    # ``folder`` is the temporary folder renamed into place whole: a plain write inside it is atomic.
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _keep_chat_template(folder: Path, template: str | None) -> str | None:
    """Put the chat template in tokenizer_config.json too, where every reader looks for it.

    transformers 5 writes it to chat_template.jinja only; runtimes and older readers look in
    tokenizer_config.json.
    """
    config_path = folder / "tokenizer_config.json"
    if not config_path.is_file():
        raise InvalidModelFileError(f"{folder}: the tokenizer was not saved")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = template
        # ``folder`` is the temporary folder renamed into place whole: a plain write inside it is atomic.
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return template
