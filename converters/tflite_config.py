"""Hugging Face ``config.json`` → the decoder litert-torch builds, per architecture family.

``read_decoder_spec`` runs in the caller (plain JSON, no torch): it checks that a folder is a
decoder we can export and turns its config into a ``DecoderSpec``, so an unsupported model fails
before a subprocess starts. ``build_model_config`` runs in the conversion worker and makes
litert-torch's ``ModelConfig`` from that spec.

Families register with the shared converter registry (``@register_converter("tflite", ...)``)
and in ``FAMILIES``, the table this module reads; both are filled once, at import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.converters import safetensors_source as st
from edge_runtime.converters.registry import register_converter
from edge_runtime.errors import (
    InvalidModelFileError,
    ModelNotFoundError,
    UnsupportedModelError,
)

LM_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
FAMILIES: dict[str, type[_Family]] = {}


@dataclass(frozen=True)
class DecoderSpec:
    """What litert-torch needs to rebuild a decoder; JSON-able, so it crosses into the worker."""

    architecture: str
    model_type: str  # "llama", "qwen2": the artifact's arch, as GGUF names it too
    vocab_size: int
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    n_params: int = 0
    # Tied weights saved once under the head's name (safetensors' save_model keeps one name of a
    # shared tensor): the embedding is read from lm_head.weight.
    embedding_from_head: bool = False
    sliding_window: int | None = None  # attention window (Mistral); the KV cache must not exceed it
    # Llama 3 frequency scaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings; None for plain RoPE.
    llama3_rope: dict[str, float] | None = None
    # Gemma 3: litert-torch's own Gemma 3 decoder, its sliding-window layers masked in the graph
    # (so any KV length is exact); per layer "full_attention" or "sliding_attention".
    gemma3: bool = False
    layer_types: list[str] | None = None
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderSpec:
        return cls(**data)


class _Family:
    """A decoder family: how its config.json maps to a ``DecoderSpec``."""

    qkv_bias_default = False

    @classmethod
    def spec(cls, config: dict[str, Any], architecture: str) -> DecoderSpec:
        text = config
        act = text.get("hidden_act") or text.get("hidden_activation") or "silu"
        if act != "silu":
            raise UnsupportedModelError(f"{architecture} with activation {act!r} cannot be exported to TFLite",
                                        "supported: SiLU-gated feed-forward decoders")
        if text.get("mlp_bias"):
            raise UnsupportedModelError(f"{architecture} with MLP biases cannot be exported to TFLite")
        heads = int(text["num_attention_heads"])
        return DecoderSpec(
            architecture=architecture,
            model_type=str(text.get("model_type") or architecture.removesuffix("ForCausalLM").lower()),
            vocab_size=int(text["vocab_size"]),
            num_layers=int(text["num_hidden_layers"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or int(text["hidden_size"]) // heads),
            rope_theta=float(_rope(text).get("rope_theta") or 10000.0),
            rms_norm_eps=float(text.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=int(text.get("max_position_embeddings") or 2048),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),  # the weights decide, below
            qkv_bias=bool(text.get("attention_bias", cls.qkv_bias_default)),
            llama3_rope=cls._llama3_rope(text, architecture),
        )

    @staticmethod
    def _llama3_rope(text: dict[str, Any], architecture: str) -> dict[str, float] | None:
        rope = _rope(text)
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind == "default":
            return None
        if kind == "llama3":
            return {
                "factor": float(rope["factor"]),
                "low_freq_factor": float(rope["low_freq_factor"]),
                "high_freq_factor": float(rope["high_freq_factor"]),
                "original_max_position_embeddings": float(rope["original_max_position_embeddings"]),
            }
        raise UnsupportedModelError(f"{architecture} with RoPE scaling {kind!r} cannot be exported to TFLite",
                                    "supported: plain RoPE and Llama 3 scaling")


def _rope(text: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 folds rope_theta and rope_scaling into rope_parameters; 4.x keeps them apart.
    merged = dict(text.get("rope_scaling") or {})
    merged.update(text.get("rope_parameters") or {})
    if "rope_theta" not in merged and text.get("rope_theta") is not None:
        merged["rope_theta"] = text["rope_theta"]
    return merged


def _family(*architectures: str):
    def register(cls: type[_Family]) -> type[_Family]:
        register_converter("tflite", *architectures)(cls)
        for arch in architectures:
            FAMILIES[arch] = cls
        return cls

    return register


@_family("LlamaForCausalLM", "MistralForCausalLM")
class LlamaFamily(_Family):
    """Llama 2/3.x, SmolLM/SmolLM2, TinyLlama, Mistral without a sliding window."""

    @classmethod
    def spec(cls, config: dict[str, Any], architecture: str) -> DecoderSpec:
        spec = super().spec(config, architecture)
        window = config.get("sliding_window")
        # A window at least as long as the exported cache never slides: plain causal attention.
        return DecoderSpec.from_dict({**spec.to_dict(), "sliding_window": int(window) if window else None})


@_family("Qwen2ForCausalLM")
class Qwen2Family(_Family):
    """Qwen2 / Qwen2.5: Llama's layout with biases on the query, key and value projections."""

    qkv_bias_default = True

    @classmethod
    def spec(cls, config: dict[str, Any], architecture: str) -> DecoderSpec:
        if config.get("use_sliding_window"):
            raise UnsupportedModelError(f"{architecture} with use_sliding_window cannot be exported to TFLite")
        return super().spec(config, architecture)


@_family("Gemma3ForCausalLM")
class Gemma3Family(_Family):
    """Gemma 3 text decoders (270M, 1B): GELU-tanh, q/k norms, (1 + w) RMS norms, scaled embedding,
    sliding-window and full layers with their own RoPE bases, the head tied to the embedding."""

    @classmethod
    def spec(cls, config: dict[str, Any], architecture: str) -> DecoderSpec:
        def unsupported(what: str) -> UnsupportedModelError:
            return UnsupportedModelError(f"{architecture} with {what} cannot be exported to TFLite",
                                         "litert-torch's Gemma 3 decoder covers the 270M and 1B text models")

        act = config.get("hidden_activation") or config.get("hidden_act")
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise unsupported(f"activation {act!r}")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if config.get(key) is not None:
                raise unsupported(key)
        if config.get("use_bidirectional_attention"):
            raise unsupported("bidirectional attention")
        heads, hidden = int(config["num_attention_heads"]), int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden // heads)
        if float(config.get("query_pre_attn_scalar") or head_dim) != head_dim:
            raise unsupported("query_pre_attn_scalar other than head_dim")  # litert scales by head_dim
        layers = int(config["num_hidden_layers"])
        pattern = int(config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6)
        types = list(config.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)])
        if len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
            raise InvalidModelFileError(f"{architecture}: layer_types does not describe {layers} layers")
        full, local = _gemma3_ropes(config)
        for rope in (full, local):
            kind = rope.get("rope_type") or rope.get("type") or "default"
            if kind != "default":
                raise unsupported(f"RoPE scaling {kind!r}")
        return DecoderSpec(
            architecture=architecture, model_type="gemma3", vocab_size=int(config["vocab_size"]),
            num_layers=layers, hidden_size=hidden, intermediate_size=int(config["intermediate_size"]),
            num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads), head_dim=head_dim,
            rope_theta=float(full.get("rope_theta") or 1_000_000.0),
            rms_norm_eps=float(config.get("rms_norm_eps") or 1e-6),
            max_position_embeddings=int(config.get("max_position_embeddings") or 32768), tie_word_embeddings=True,
            qkv_bias=bool(config.get("attention_bias", False)), sliding_window=int(config.get("sliding_window") or 512),
            gemma3=True, layer_types=types, rope_local_theta=float(local.get("rope_theta") or 10_000.0),
        )


def _gemma3_ropes(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """RoPE of the full and of the sliding-window layers (transformers 5 nests them per layer type)."""
    params = config.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
    full = _rope(config)
    return full, {"rope_theta": config.get("rope_local_base_freq") or 10_000.0}


def supported_architectures() -> list[str]:
    """HF ``architectures`` names this converter exports, sorted."""
    return sorted(FAMILIES)


def read_decoder_spec(src: str | Path) -> DecoderSpec:
    """Read and check a Hugging Face folder's config.json; raises before any heavy work."""
    folder = Path(src).expanduser()
    config_path = folder / "config.json"
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: no such folder", "give a Hugging Face model folder")
    if not config_path.is_file():
        raise InvalidModelFileError(f"{folder}: no config.json; not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidModelFileError(f"{config_path}: unreadable ({exc})") from None
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else str(config.get("model_type", "?"))
    family = FAMILIES.get(architecture)
    if family is None:
        raise UnsupportedModelError(f"architecture {architecture!r} cannot be converted to TFLITE",
                                    f"supported: {', '.join(supported_architectures())}")
    try:
        spec = family.spec(config, architecture)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModelFileError(f"{config_path}: missing or malformed field ({exc})") from None
    tensors = [ref for shard in st.find_shards(folder) for ref in st.read_header(shard)]
    names = {ref.name for ref in tensors}
    if EMBEDDING not in names and LM_HEAD not in names:
        raise InvalidModelFileError(f"{folder}: the weights hold neither {EMBEDDING} nor {LM_HEAD}")
    if spec.gemma3 and LM_HEAD in names and EMBEDDING in names:
        raise UnsupportedModelError(f"{architecture} with a separate lm_head cannot be exported to TFLite",
                                    "litert-torch's Gemma 3 decoder ties the head to the embedding")
    # The checkpoint decides whether the head is tied: configs leave the flag out as often as not.
    return DecoderSpec.from_dict({
        **spec.to_dict(), "tie_word_embeddings": not (EMBEDDING in names and LM_HEAD in names),
        "embedding_from_head": EMBEDDING not in names, "n_params": sum(ref.n_elements for ref in tensors),
    })


def shard_paths(src: str | Path) -> list[Path]:
    """The checkpoint's shard files (as its index lists them), for the worker's loader."""
    return st.find_shards(Path(src).expanduser())


def build_model_config(spec: DecoderSpec, kv_cache_max_len: int) -> Any:
    """litert-torch's ``ModelConfig`` for ``spec`` (imports litert-torch: worker only)."""
    import litert_torch.generative.layers.model_config as cfg

    if spec.gemma3:
        return _gemma3_model_config(spec, kv_cache_max_len)

    attn = cfg.AttentionConfig(
        num_heads=spec.num_heads, head_dim=spec.head_dim, num_query_groups=spec.num_kv_heads,
        rotary_base=spec.rope_theta, rotary_percentage=1.0, qkv_use_bias=spec.qkv_bias,
    )
    ff = cfg.FeedForwardConfig(
        type=cfg.FeedForwardType.GATED, activation=cfg.ActivationConfig(cfg.ActivationType.SILU),
        intermediate_size=spec.intermediate_size,
    )
    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=spec.rms_norm_eps)
    block = cfg.TransformerBlockConfig(attn_config=attn, ff_config=ff, pre_attention_norm_config=norm,
                                       post_attention_norm_config=norm)
    extra: dict[str, Any] = {}
    if spec.llama3_rope is not None:
        extra["build_rope"] = _llama3_rope_builder(spec.llama3_rope)
    return cfg.ModelConfig(
        vocab_size=spec.vocab_size, num_layers=spec.num_layers,
        # The mask cache (kv_cache_max_len square) must fit max_seq_len.
        max_seq_len=max(spec.max_position_embeddings, kv_cache_max_len),
        embedding_dim=spec.hidden_size, block_configs=block, final_norm_config=norm,
        lm_head_share_weight_with_embedding=spec.tie_word_embeddings, **extra,
    )


def _llama3_rope_builder(rope: dict[str, float]) -> Any:
    from functools import partial

    import torch
    from litert_torch.generative.examples.llama import llama

    # litert-torch's own Llama 3.2 RoPE (the same frequency scaling as transformers').
    return partial(
        llama._build_llama3_rope_cache, condense_ratio=1, dtype=torch.float32, device=torch.device("cpu"),
        factor=rope["factor"], low_freq_factor=rope["low_freq_factor"], high_freq_factor=rope["high_freq_factor"],
        max_seq_len=int(rope["original_max_position_embeddings"]),
    )


def _gemma3_model_config(spec: DecoderSpec, kv_cache_max_len: int) -> Any:
    """The config litert-torch's ``examples/gemma3`` decoder takes, from the checkpoint's own numbers
    (its built-in 270M/1B configs hard-code the layer pattern)."""
    import litert_torch.generative.layers.model_config as cfg

    norm = cfg.NormalizationConfig(type=cfg.NormalizationType.RMS_NORM, epsilon=spec.rms_norm_eps, zero_centered=True)
    ff = cfg.FeedForwardConfig(
        type=cfg.FeedForwardType.GATED, activation=cfg.ActivationConfig(cfg.ActivationType.GELU_TANH),
        intermediate_size=spec.intermediate_size, pre_ff_norm_config=norm, post_ff_norm_config=norm,
    )

    def block(kind: str) -> Any:
        full = kind == "full_attention"
        attn = cfg.AttentionConfig(
            num_heads=spec.num_heads, head_dim=spec.head_dim, num_query_groups=spec.num_kv_heads,
            rotary_base=spec.rope_theta if full else spec.rope_local_theta, rotary_percentage=1.0,
            qkv_use_bias=spec.qkv_bias, query_norm_config=norm, key_norm_config=norm,
            # The q/k norms act per head: split the fused projection into heads first, and fuse it
            # q-then-k-then-v (not interleaved per group), which that split reads right for any
            # number of KV heads.
            qkv_transpose_before_split=True, qkv_fused_interleaved=False,
            sliding_window_size=spec.sliding_window,
            attn_type=cfg.AttentionType.GLOBAL if full else cfg.AttentionType.LOCAL_SLIDING,
        )
        return cfg.TransformerBlockConfig(attn_config=attn, ff_config=ff, pre_attention_norm_config=norm,
                                          post_attention_norm_config=norm)

    return cfg.ModelConfig(
        vocab_size=spec.vocab_size, num_layers=spec.num_layers,
        max_seq_len=max(spec.max_position_embeddings, kv_cache_max_len), embedding_dim=spec.hidden_size,
        embedding_scale=spec.hidden_size**0.5, block_configs=[block(t) for t in spec.layer_types or ()],
        final_norm_config=norm, lm_head_use_bias=False, final_logit_softcap=None,
    )
