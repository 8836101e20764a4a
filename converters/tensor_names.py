"""One table of tensor names: Hugging Face checkpoint names and the GGUF tensor each becomes.

GGUF names come from ``gguf.constants`` (``TENSOR_NAMES``), never assembled by hand. We keep our
own Hugging Face side instead of building a ``gguf.TensorNameMap``: its constructor updates a
class-level dict with per-architecture overrides, so maps built later in a long-lived process
depend on which architectures were converted before (see EXAMPLES.md). A plain table per family
is smaller, frozen and the same on every call; the TFLite and ONNX converters can read it too.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import MODEL_TENSOR, TENSOR_NAMES

T = MODEL_TENSOR


@dataclass(frozen=True)
class TensorName:
    """One checkpoint tensor: its HF name (``{bid}`` for the block), GGUF kind and suffix."""

    hf: str
    kind: MODEL_TENSOR
    suffix: str = ".weight"
    optional: bool = False  # present only with some config flags (biases, tied heads)

    def hf_name(self, bid: int | None = None) -> str:
        """The checkpoint name, for block ``bid`` when per-block."""
        return self.hf.format(bid=bid) if bid is not None else self.hf

    def gguf_name(self, bid: int | None = None) -> str:
        """The GGUF tensor name (``blk.3.attn_q.weight``)."""
        base = TENSOR_NAMES[self.kind]
        return (base.format(bid=bid) if bid is not None else base) + self.suffix

    @property
    def per_block(self) -> bool:
        return "{bid}" in self.hf


_ATTN = "model.layers.{bid}.self_attn."
_MLP = "model.layers.{bid}.mlp."

# Llama, Mistral, SmolLM, TinyLlama: the layout every later decoder copied.
LLAMA: tuple[TensorName, ...] = (
    TensorName("model.embed_tokens.weight", T.TOKEN_EMBD),
    TensorName("model.norm.weight", T.OUTPUT_NORM),
    TensorName("lm_head.weight", T.OUTPUT, optional=True),  # absent when tied to the embedding
    TensorName("model.layers.{bid}.input_layernorm.weight", T.ATTN_NORM),
    TensorName(_ATTN + "q_proj.weight", T.ATTN_Q),
    TensorName(_ATTN + "k_proj.weight", T.ATTN_K),
    TensorName(_ATTN + "v_proj.weight", T.ATTN_V),
    TensorName(_ATTN + "o_proj.weight", T.ATTN_OUT),
    TensorName(_ATTN + "q_proj.bias", T.ATTN_Q, ".bias", optional=True),  # attention_bias
    TensorName(_ATTN + "k_proj.bias", T.ATTN_K, ".bias", optional=True),
    TensorName(_ATTN + "v_proj.bias", T.ATTN_V, ".bias", optional=True),
    TensorName(_ATTN + "o_proj.bias", T.ATTN_OUT, ".bias", optional=True),
    TensorName("model.layers.{bid}.post_attention_layernorm.weight", T.FFN_NORM),
    TensorName(_MLP + "gate_proj.weight", T.FFN_GATE),
    TensorName(_MLP + "up_proj.weight", T.FFN_UP),
    TensorName(_MLP + "down_proj.weight", T.FFN_DOWN),
)

# Qwen2: Llama's layout with q/k/v biases always present.
QWEN2: tuple[TensorName, ...] = tuple(
    TensorName(n.hf, n.kind, n.suffix, optional=False)
    if n.hf.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
    else n
    for n in LLAMA
    if not n.hf.endswith("o_proj.bias")
)

# Gemma 3 (text): Llama's projections plus q/k norms and a norm after attention and after the
# FFN; "pre_feedforward_layernorm" is GGUF's FFN_PRE_NORM (named ffn_norm in the file).
GEMMA3: tuple[TensorName, ...] = (
    TensorName("model.embed_tokens.weight", T.TOKEN_EMBD),
    TensorName("model.norm.weight", T.OUTPUT_NORM),
    TensorName("model.layers.{bid}.input_layernorm.weight", T.ATTN_NORM),
    TensorName(_ATTN + "q_proj.weight", T.ATTN_Q),
    TensorName(_ATTN + "k_proj.weight", T.ATTN_K),
    TensorName(_ATTN + "v_proj.weight", T.ATTN_V),
    TensorName(_ATTN + "o_proj.weight", T.ATTN_OUT),
    TensorName(_ATTN + "q_norm.weight", T.ATTN_Q_NORM),
    TensorName(_ATTN + "k_norm.weight", T.ATTN_K_NORM),
    TensorName("model.layers.{bid}.post_attention_layernorm.weight", T.ATTN_POST_NORM),
    TensorName("model.layers.{bid}.pre_feedforward_layernorm.weight", T.FFN_PRE_NORM),
    TensorName("model.layers.{bid}.post_feedforward_layernorm.weight", T.FFN_POST_NORM),
    TensorName(_MLP + "gate_proj.weight", T.FFN_GATE),
    TensorName(_MLP + "up_proj.weight", T.FFN_UP),
    TensorName(_MLP + "down_proj.weight", T.FFN_DOWN),
)

# Checkpoint entries that carry no weights llama.cpp needs (recomputed at load time).
IGNORED_SUFFIXES: tuple[str, ...] = ("rotary_emb.inv_freq",)


def expand(table: tuple[TensorName, ...], n_blocks: int) -> dict[str, tuple[TensorName, int | None]]:
    """Every concrete HF tensor name of a table, mapped to its entry and block id."""
    out: dict[str, tuple[TensorName, int | None]] = {}
    for entry in table:
        if not entry.per_block:
            out[entry.hf_name()] = (entry, None)
            continue
        for bid in range(n_blocks):
            out[entry.hf_name(bid)] = (entry, bid)
    return out
