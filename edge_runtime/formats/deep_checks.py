"""Checks that read a whole model file's tables: run once for a file never loaded before (and
again when it changes), not at every start, since they cost more than a header walk.

- GGUF: a vocabulary with the same token twice passes the header reader (which skips the
  tokenizer's strings without decoding them) and makes llama.cpp abort the process
  (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``); here it is a one-line error.
- GGUF: hyperparameters llama.cpp asserts on while loading (``block_count`` in 1..512, the
  expert counts and groups, the rope scaling type) are checked the way it checks them.
- GGUF: a ``context_length`` past int32 (read back negative: a context of 2**31 tokens, which
  takes minutes to fail) and a negative or NaN norm epsilon (``GGML_ASSERT(eps >= 0.0f)`` at the
  first token).
- GGUF: a weight stored as an integer type (I8 .. I64) loads, and the first matrix product on
  it is a SIGSEGV (no kernel multiplies integer weights); no model llama.cpp runs has one.
- TFLite: LiteRT reads the FlatBuffer without verifying it (a wild offset is a SIGSEGV), so the
  whole of it is verified first (``tflite_verify``).
"""

from __future__ import annotations

import math
import os
import struct

from edge_runtime.errors import InvalidModelFileError
from edge_runtime.formats.gguf import _Parser, read_gguf_header
from edge_runtime.formats.gguf_header import GGUFArray, GGUFHeader

TOKENS = "tokenizer.ggml.tokens"
_U64 = struct.Struct("<Q")
MAX_LAYERS, MAX_EXPERTS = 512, 1024  # llama.cpp's LLAMA_MAX_LAYERS, LLAMA_MAX_EXPERTS
MAX_CONTEXT = 2**31 - 1  # llama_model_n_ctx_train returns an int32: more reads back as negative
EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")  # ggml asserts eps >= 0
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
INTEGER_TYPES = ("I8", "I16", "I32", "I64")  # ggml's integer tensor types: never a model weight


def check_deeply(path: str | os.PathLike[str], fmt: str) -> None:
    """Run the whole-table checks of ``fmt`` on ``path`` (``InvalidModelFileError`` on a flaw)."""
    if fmt == "gguf":
        _check_hyperparameters(read_gguf_header(path, parser=_VocabularyParser))
    elif fmt == "tflite":
        from edge_runtime.formats.tflite_verify import verify_tflite  # a GGUF run does not pay for it

        verify_tflite(path)


class _VocabularyParser(_Parser):
    """The header walk, with every token of the vocabulary compared as raw bytes (as llama.cpp does)."""

    def string_array(self, key: str, n: int, keep: bool) -> tuple[str, ...] | None:
        if key != TOKENS:
            return super().string_array(key, n, keep)
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        seen: dict[bytes, int] = {}
        for i in range(n):
            if pos + 8 > size:
                raise self.past_end(f"metadata key {key!r}: string {i} of {n}", pos + 8)
            start = pos + 8
            pos = start + unpack(buf, pos)[0]
            if pos > size:
                raise self.past_end(f"metadata key {key!r}: string {i} of {n}", pos)
            token = buf[start:pos] or b"[EMPTY_%d]" % i  # llama.cpp's name for an empty token
            first = seen.setdefault(token, i)
            if first != i:
                raise self.fail(f"{key}: token {i} {token[:40]!r} is token {first} again "
                                "(llama.cpp aborts on a repeated token)")
        self.pos = pos
        return None


def _check_hyperparameters(header: GGUFHeader) -> None:
    """The hyperparameters llama.cpp loads with a GGML_ASSERT (an abort) instead of an error."""

    def fail(problem: str) -> InvalidModelFileError:
        return InvalidModelFileError(f"{header.path}: {problem} (llama.cpp aborts or stalls on it)",
                                     "convert or download the model again")

    def count(suffix: str, default: int = 0) -> int:
        value = header.arch_key(suffix, default)
        if isinstance(value, GGUFArray):  # per-layer values: their largest
            return max((v for v in value.values or () if isinstance(v, int)), default=default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    layers = count("block_count")
    if not 0 < layers <= MAX_LAYERS:
        raise fail(f"block_count is {layers}, not 1 to {MAX_LAYERS}")
    for suffix in ("nextn_predict_layers", "posnet.block_count", "convnext.block_count"):
        if count(suffix) > layers:
            raise fail(f"{suffix} is {count(suffix)}, more than the {layers} blocks")
    experts, used = count("expert_count"), count("expert_used_count")
    groups, groups_used = count("expert_group_count"), count("expert_group_used_count")
    if experts > MAX_EXPERTS or used > experts:
        raise fail(f"{used} of {experts} experts used (at most {MAX_EXPERTS})")
    if experts and (not used or groups >= experts or groups > 1 and (experts % groups or not 0 < groups_used < groups)):
        raise fail(f"{experts} experts, {used} used, in {groups} groups of which {groups_used} used")
    if not experts and groups:
        raise fail(f"{groups} expert groups but no experts")
    context = header.arch_key("context_length")
    if isinstance(context, int) and not 0 < context <= MAX_CONTEXT:
        raise fail(f"context_length is {context}, not 1 to {MAX_CONTEXT}")
    for suffix in EPSILONS:
        eps = header.arch_key(suffix)
        if isinstance(eps, float) and not (math.isfinite(eps) and eps >= 0):
            raise fail(f"{suffix} is {eps}, not a finite value >= 0")
    scaling = header.arch_key("rope.scaling.type")
    if isinstance(scaling, str) and scaling not in ROPE_SCALING_TYPES:
        raise fail(f"rope.scaling.type {scaling[:40]!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    integer = next((t for t in header.tensors if t.type_name in INTEGER_TYPES), None)
    if integer is not None:
        raise fail(f"tensor {integer.name!r} holds {integer.type_name}, an integer type no weight has")
