"""Per-family knowledge for HF → GGUF: hyperparameter keys, expected shapes, weight layout.

One class per family, registered for the HF architectures it covers. A family answers four
questions, all from ``config.json`` alone so a source can be checked before anything is written:
which tensors exist (``tensor_names.py``), what shape each must have, how rows are reordered for
llama.cpp, and which metadata keys describe the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from gguf import GGUFWriter
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, RopeScalingType

from edge_runtime.converters import tensor_names as tn
from edge_runtime.converters.registry import register_converter
from edge_runtime.errors import InvalidModelFileError, UnsupportedModelError

T = MODEL_TENSOR
NORM_KINDS = frozenset({T.ATTN_NORM, T.FFN_NORM, T.OUTPUT_NORM, T.ATTN_Q_NORM, T.ATTN_K_NORM,
                        T.ATTN_POST_NORM, T.FFN_PRE_NORM, T.FFN_POST_NORM})


@dataclass(frozen=True)
class HParams:
    """The hyperparameters a decoder conversion needs, read from ``config.json``."""

    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied: bool
    rope: dict[str, Any] = field(default_factory=dict)  # the (global-attention) rope parameters
    rope_local_theta: float | None = None  # sliding-window layers' rope base, where it differs
    config: dict[str, Any] = field(default_factory=dict, compare=False)  # everything else

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> HParams:
        """Read ``config.json``'s values; a missing or non-positive size raises (``where`` names it)."""

        def need(key: str) -> int:
            value = config.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidModelFileError(f"{where}: config.json needs a positive integer {key!r}")
            return value

        hidden, n_heads = need("hidden_size"), need("num_attention_heads")
        # transformers 5 nests rope under rope_parameters (per attention kind for Gemma 3);
        # older configs keep rope_theta at the top and scaling in rope_scaling.
        rope_all = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope = dict(rope_all.get("full_attention", rope_all))
        theta = rope.get("rope_theta") or config.get("rope_theta") or 10000.0
        local = rope_all.get("sliding_attention", {}).get("rope_theta") or config.get("rope_local_base_freq")
        n_kv = config.get("num_key_value_heads") or n_heads
        head_dim = config.get("head_dim") or hidden // n_heads
        if n_heads % n_kv:
            raise InvalidModelFileError(f"{where}: {n_heads} attention heads are not a multiple of {n_kv} KV heads")
        return cls(
            hidden=hidden, n_layers=need("num_hidden_layers"), n_heads=n_heads, n_kv_heads=int(n_kv),
            head_dim=int(head_dim), ffn=need("intermediate_size"), vocab=need("vocab_size"),
            n_ctx=int(config.get("max_position_embeddings") or 2048), rope_theta=float(theta),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            tied=bool(config.get("tie_word_embeddings", False)), rope=rope,
            rope_local_theta=float(local) if local else None, config=config,
        )


class GGUFArch:
    """A decoder family: shapes, row order and metadata for its GGUF form."""

    gguf_arch: ClassVar[MODEL_ARCH]
    table: ClassVar[tuple[tn.TensorName, ...]]
    architectures: ClassVar[tuple[str, ...]] = ()
    # llama.cpp's rope for this arch pairs rotary dims as (0,1),(2,3)... while HF pairs
    # (0, d/2),(1, d/2+1)...; the q/k rows are reordered so both rotate the same pairs.
    interleave_qk: ClassVar[bool] = False

    def __init__(self, hp: HParams) -> None:
        self.hp = hp
        for entry in self.table:
            if entry.kind not in MODEL_TENSORS[self.gguf_arch]:
                raise RuntimeError(f"{entry.kind.name} is not a tensor of {self.arch_name}")

    @property
    def arch_name(self) -> str:
        """The GGUF ``general.architecture`` value ("llama", "qwen2", "gemma3")."""
        return MODEL_ARCH_NAMES[self.gguf_arch]

    def expected_tensors(self, present: set[str]) -> dict[str, tuple[tn.TensorName, int | None]]:
        """HF name → table entry for every tensor to write; missing required ones raise."""
        names = tn.expand(self.table, self.hp.n_layers)
        chosen, missing = {}, []
        for hf, (entry, bid) in names.items():
            if entry.kind is T.OUTPUT and self.hp.tied:
                continue  # tied head: llama.cpp reuses token_embd when output is absent
            if hf in present:
                chosen[hf] = (entry, bid)
            elif not entry.optional:
                missing.append(hf)
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise InvalidModelFileError(f"the checkpoint lacks {len(missing)} tensor(s): {shown}")
        unknown = sorted(n for n in present - set(names) if not n.endswith(tn.IGNORED_SUFFIXES))
        if self.hp.tied:
            unknown = [n for n in unknown if n != "lm_head.weight"]
        if unknown:
            raise UnsupportedModelError(
                f"the checkpoint has tensor(s) this converter does not know: {', '.join(unknown[:4])}",
                "the model differs from the standard layout of its architecture",
            )
        return chosen

    def expected_shape(self, entry: tn.TensorName) -> tuple[int, ...]:
        """The HF (row-major) shape a tensor must have under this config."""
        hp = self.hp
        q, kv = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
        rows = {
            T.TOKEN_EMBD: (hp.vocab, hp.hidden), T.OUTPUT: (hp.vocab, hp.hidden),
            T.ATTN_Q: (q, hp.hidden), T.ATTN_K: (kv, hp.hidden), T.ATTN_V: (kv, hp.hidden),
            T.ATTN_OUT: (hp.hidden, q), T.FFN_GATE: (hp.ffn, hp.hidden),
            T.FFN_UP: (hp.ffn, hp.hidden), T.FFN_DOWN: (hp.hidden, hp.ffn),
            T.ATTN_Q_NORM: (hp.head_dim,), T.ATTN_K_NORM: (hp.head_dim,),
        }
        if entry.kind in NORM_KINDS and entry.kind not in rows:
            return (hp.hidden,)
        shape = rows[entry.kind]
        return shape[:1] if entry.suffix == ".bias" else shape

    def keeps_f32(self, entry: tn.TensorName) -> bool:
        """Norms and biases stay float32 whatever the outtype (llama.cpp expects them so)."""
        return entry.suffix != ".weight" or entry.kind in NORM_KINDS

    def row_order(self, entry: tn.TensorName) -> np.ndarray | None:
        """For a tensor whose rows move: ``order[source_row] = destination_row``; else None."""
        if not self.interleave_qk or entry.kind not in (T.ATTN_Q, T.ATTN_K):
            return None
        n_head = self.hp.n_heads if entry.kind is T.ATTN_Q else self.hp.n_kv_heads
        half = self.hp.head_dim // 2
        # destination row (h, j, i) takes source row (h, i, j): i picks the half, j the pair
        source_of = np.arange(n_head * 2 * half).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)
        return np.argsort(source_of)

    def transform(self, entry: tn.TensorName, rows: np.ndarray) -> np.ndarray:
        """Value changes a family needs (Gemma's norm offset); identity by default."""
        return rows

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Tensors llama.cpp needs that the checkpoint does not hold (computed, float32)."""
        return []

    def write_hparams(self, w: GGUFWriter) -> None:
        """Add the ``{arch}.*`` hyperparameter keys llama.cpp reads for this family."""
        hp = self.hp
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.hidden)
        w.add_block_count(hp.n_layers)
        w.add_feed_forward_length(hp.ffn)
        w.add_head_count(hp.n_heads)
        w.add_head_count_kv(hp.n_kv_heads)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        self._write_rope_scaling(w)

    def _write_rope_scaling(self, w: GGUFWriter) -> None:
        kind = str(self.hp.rope.get("rope_type") or self.hp.rope.get("type") or "default").lower()
        factor = self.hp.rope.get("factor")
        # llama3 is carried by the rope_freqs tensor; dynamic NTK only acts past the trained
        # context, which llama.cpp does not stretch on its own (the same model within it).
        if kind in ("default", "llama3", "dynamic"):
            return
        if kind == "linear" and factor:
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif kind == "yarn" and factor:
            w.add_rope_scaling_type(RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            w.add_rope_scaling_orig_ctx_len(int(self.hp.rope["original_max_position_embeddings"]))
        else:
            raise UnsupportedModelError(f"rope scaling {kind!r} is not supported by this converter")


@register_converter("gguf", "LlamaForCausalLM", "MistralForCausalLM")
class LlamaArch(GGUFArch):
    """Llama 1-3.x, Mistral 7B, SmolLM/SmolLM2, TinyLlama."""

    gguf_arch = MODEL_ARCH.LLAMA
    table = tn.LLAMA
    interleave_qk = True

    def write_hparams(self, w: GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_vocab_size(self.hp.vocab)
        w.add_rope_dimension_count(self.hp.head_dim)

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        rope = self.hp.rope
        if str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        return [(tn.TensorName("rope_freqs", T.ROPE_FREQS).gguf_name(), llama3_rope_factors(self.hp))]


@register_converter("gguf", "Qwen2ForCausalLM")
class Qwen2Arch(GGUFArch):
    """Qwen2 and Qwen2.5 (dense): Llama's layout plus q/k/v biases, NeoX rope (no reorder)."""

    gguf_arch = MODEL_ARCH.QWEN2
    table = tn.QWEN2


@register_converter("gguf", "Gemma3ForCausalLM")
class Gemma3Arch(GGUFArch):
    """Gemma 3 text models (270M, 1B; the text tower layout of the larger ones)."""

    gguf_arch = MODEL_ARCH.GEMMA3
    table = tn.GEMMA3

    def __init__(self, hp: HParams) -> None:
        super().__init__(hp)
        cfg = hp.config
        if cfg.get("attn_logit_softcapping") is not None or cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError("this Gemma 3 variant (softcapped or bidirectional attention) "
                                        "is not supported")
        # llama.cpp scales queries by 1/sqrt(head_dim) (27B: 1/sqrt(hidden/heads)); HF by
        # query_pre_attn_scalar^-1/2. They agree for every published size; refuse a config where not.
        scalar = cfg.get("query_pre_attn_scalar", hp.head_dim)
        expected = hp.hidden // hp.n_heads if hp.n_layers == 62 else hp.head_dim
        if scalar != expected:
            raise UnsupportedModelError(f"query_pre_attn_scalar {scalar} differs from the {expected} llama.cpp uses")

    def transform(self, entry: tn.TensorName, rows: np.ndarray) -> np.ndarray:
        # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight.
        return rows + np.float32(1.0) if entry.kind in NORM_KINDS else rows

    def sliding_layers(self) -> list[bool]:
        """Per layer: does it attend through the sliding window (else to the whole context)?"""
        cfg = self.hp.config
        types = cfg.get("layer_types")
        if isinstance(types, list) and len(types) == self.hp.n_layers:
            return [t == "sliding_attention" for t in types]
        pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
        return [(i + 1) % pattern != 0 for i in range(self.hp.n_layers)]

    def write_hparams(self, w: GGUFWriter) -> None:
        super().write_hparams(w)
        window = self.hp.config.get("sliding_window")
        sliding = self.sliding_layers()
        if window and any(sliding):
            w.add_sliding_window(int(window))
            w.add_sliding_window_pattern(sliding)
            w.add_rope_freq_base_swa(self.hp.rope_local_theta or 10000.0)
        if softcap := self.hp.config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(softcap))


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Llama 3.1's per-frequency rope divisors: long wavelengths scaled, short ones kept."""
    rope = hp.rope
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    out = np.empty(inv_freq.shape, dtype=np.float32)
    for i, freq in enumerate(inv_freq):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old_ctx / high:
            out[i] = 1.0
        elif wavelen > old_ctx / low:
            out[i] = factor
        else:  # blend between the two regimes
            smooth = (old_ctx / wavelen - low) / (high - low)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out
