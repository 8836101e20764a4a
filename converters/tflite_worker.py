"""Child process for ``to_tflite.py``: rebuild the decoder in litert-torch and write the .tflite.

Run as ``python -m edge_runtime.converters.tflite_worker '<json request>'``. One JSON object per
line goes to the original stdout: ``{"log": line}`` for each progress line litert-torch prints,
then ``{"file": path}`` on success or ``{"error": text}``. Everything else (TensorFlow's and
torch's own chatter) goes to stderr, so the protocol stream carries only those lines.

torch export, MLIR lowering and the TFLite converter hold gigabytes and can abort the process;
in a child, the caller keeps its memory and survives a crash, and Ctrl-C can end it at once.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any

from edge_runtime.converters.worker_process import open_protocol, send


class _ProgressLines:
    """A file for rich's Console: forwards each printed line as a protocol message."""

    def __init__(self, protocol: IO[str]) -> None:
        self.protocol = protocol
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            if line.strip():
                send(self.protocol, log=line.strip())
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def _load_shards(paths: list[str], embedding_from_head: bool) -> Any:
    def load(_checkpoint: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        from edge_runtime.converters.tflite_config import EMBEDDING, LM_HEAD

        # Only the shards the index names: a folder may also hold stray or duplicate files.
        state: dict[str, Any] = {}
        for path in paths:
            state.update(load_file(path))
        if embedding_from_head:
            state[EMBEDDING] = state.pop(LM_HEAD)
        return state

    return load


def convert(request: dict[str, Any], protocol: IO[str]) -> str:
    """Build the model from the request's spec and weights; return the written file's path."""
    from litert_torch import progress
    from litert_torch.generative.utilities import (
        converter,
        export_config,
        model_builder,
    )
    from rich.console import Console

    from edge_runtime.converters.tflite_config import DecoderSpec, build_model_config

    # litert-torch prints its steps through this console; the parent turns them into progress.
    progress.console = Console(file=_ProgressLines(protocol), width=1000, color_system=None,
                               force_terminal=False, highlight=False, soft_wrap=True)
    spec = DecoderSpec.from_dict(request["spec"])
    kv_len = int(request["kv_cache_max_len"])
    config = build_model_config(spec, kv_len)
    loader = _load_shards(request["shards"], spec.embedding_from_head)
    if spec.gemma3:
        from litert_torch.generative.examples.gemma3 import decoder as gemma3

        model = model_builder.build_decoder_only_model(
            request["src"], config, gemma3.TENSOR_NAMES_SEP_QKV, model_class=gemma3.Decoder,
            custom_loader=loader, mask_cache_size=kv_len)
    else:
        names = (model_builder.TENSOR_NAMES if spec.tie_word_embeddings
                 else model_builder.TENSOR_NAMES_WITH_SEPARATE_LM_HEAD)
        model = model_builder.build_decoder_only_model(request["src"], config, names, custom_loader=loader,
                                                       mask_cache_size=kv_len)
    return converter.convert_to_tflite(
        model, request["out_dir"], "model", prefill_seq_len=list(request["prefill_lengths"]),
        kv_cache_max_len=kv_len, quantize=request["quantize"], config=config,
        export_config=export_config.ExportConfig(output_logits_on_prefill=True),
    )


def main(argv: list[str]) -> int:
    """Convert as the JSON request in ``argv[1]`` says."""
    request = json.loads(argv[1])
    protocol = open_protocol()  # the parent owns Ctrl-C: it kills this process, removes the temporary folder
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if request.get("threads"):
        import torch

        torch.set_num_threads(int(request["threads"]))
    try:
        path = convert(request, protocol)
    except Exception as exc:  # reported to the parent, which raises a user-facing error
        text = str(exc).strip().splitlines()
        send(protocol, error=f"{type(exc).__name__}: {text[0] if text else ''}")
        raise
    send(protocol, file=path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
