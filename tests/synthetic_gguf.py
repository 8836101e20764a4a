"""Header-only GGUF files of real model shapes (sparse: the weights are holes, not bytes).

They stand in for models this machine cannot download (a 1B or 8B checkpoint): the header and
tensor table are exactly what such a file holds, so the header reader, the memory estimate and
the planner see a real file of the right size.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType

LLAMA_3_2_1B = dict(n_layer=16, n_embd=2048, n_ff=8192, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx_train=131072)
LLAMA_3_1_8B = dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256, n_ctx_train=131072)


def _nbytes(shape: tuple[int, ...], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def write_llama_gguf(path: Path, *, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int,
                     n_vocab: int, n_ctx_train: int, qtype: Q = Q.Q4_0, name: str = "synthetic") -> Path:
    """Write a sparse Llama-architecture GGUF with the tensor table of the given shape."""
    head_dim = n_embd // n_head
    tensors: list[tuple[str, tuple[int, ...], Q]] = [("token_embd.weight", (n_vocab, n_embd), qtype)]
    for i in range(n_layer):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (n_embd,), Q.F32),
            (f"blk.{i}.attn_q.weight", (n_embd, n_embd), qtype),
            (f"blk.{i}.attn_k.weight", (n_head_kv * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_v.weight", (n_head_kv * head_dim, n_embd), qtype),
            (f"blk.{i}.attn_output.weight", (n_embd, n_embd), qtype),
            (f"blk.{i}.ffn_norm.weight", (n_embd,), Q.F32),
            (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd), qtype),
            (f"blk.{i}.ffn_up.weight", (n_ff, n_embd), qtype),
            (f"blk.{i}.ffn_down.weight", (n_embd, n_ff), qtype),
        ]
    tensors.append(("output_norm.weight", (n_embd,), Q.F32))
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(n_ctx_train)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_block_count(n_layer)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type({Q.Q4_0: 2, Q.Q8_0: 7, Q.F16: 1}[qtype])
    data_bytes = 0
    for tname, shape, tq in tensors:
        nbytes = _nbytes(shape, tq)
        if tq == Q.F32:
            writer.add_tensor_info(tname, shape, np.dtype(np.float32), nbytes, raw_dtype=tq)
        else:  # quantized tensors are described by their shape in bytes
            block, size = gguf.GGML_QUANT_SIZES[tq]
            byte_shape = (*shape[:-1], shape[-1] // block * size)
            writer.add_tensor_info(tname, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=tq)
        data_bytes += -(-nbytes // 32) * 32
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_bytes = -(-path.stat().st_size // 32) * 32
    os.truncate(path, header_bytes + data_bytes)  # a hole, not gigabytes on disk
    return path
