"""Tiny Hugging Face models for converter tests: random weights, a tokenizer trained on the spot.

Registered as a pytest plugin (``pytest_plugins = ["tiny_models"]`` in conftest.py). Session
fixtures, each a folder ``save_pretrained`` wrote (config.json, sharded safetensors with
``model.safetensors.index.json``, tokenizer.json, tokenizer_config.json with a chat template,
generation_config.json):

- ``tiny_llama_dir``: a 2-layer ``LlamaForCausalLM`` (hidden 64, 4 heads, 2 KV heads) in float32.
  Reuse it for any converter (GGUF, TFLite, ONNX) and for evaluation tests.
- ``tiny_llama_dtype_dirs``: the same weights saved as ``{"f32": ..., "f16": ..., "bf16": ...}``.
- ``tiny_family_dirs``: ``{"llama", "mistral", "qwen2"}`` → float32 folders of the same size
  (Qwen2 with its q/k/v biases).
- ``tiny_llama_256_dir``: hidden 256 / FFN 512, so every row fits llama.cpp's 256-wide k-quant
  blocks (quantization tests without fallbacks).
- ``spm_llama_dir``: a tiny random Llama whose tokenizer is a SentencePiece ``tokenizer.model``
  trained on the spot (800 pieces, byte fallback), as Llama 2, Mistral and TinyLlama ship.
- ``tiny_gemma3_dir``: a tiny random ``Gemma3ForCausalLM`` (sliding-window and full layers, q/k
  norms) with a Gemma-style SentencePiece tokenizer (no "▁" prefix), float32.
- ``smollm2_vocab_dirs``: ``{rules: folder}`` of tiny random Llamas (numpy weights, no torch)
  carrying the real SmolLM2 vocabulary and merges, taken from the embedded GGUF, under different
  pre-tokenizer rules: ``smollm`` (the published tokenizer, recognised by its hash), ``gpt2``,
  ``qwen2`` and ``llama3`` (recognised by their split rules).

The tokenizer is a byte-level BPE with Llama 3's split rules, trained on a slice of the Python
documentation (``pydoc_data.topics``) plus a few lines of unicode, with special tokens
``<|begin_of_text|>`` (BOS, added on encode), ``<|end_of_text|>`` (EOS), ``<|im_start|>``/``<|im_end|>``
(chat) and one plain added token ``<tool>``. Everything is built once and cached under the pytest cache, keyed by
``TINY_MODELS_VERSION``: bump it when the recipe changes. Builders are plain functions
(``build_tiny_llama``) for scripts that want their own variant.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

TINY_MODELS_VERSION = "4"
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")
PLAIN_ADDED_TOKEN = "<tool>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
UNICODE_LINES = [
    "Café déjà vu, naïve façade — “quoted” ‘text’ … 100 € or £5",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Привет, мир! Ελληνικά γράμματα. עברית ועוד",
    "emoji 🚀🦙😁 👩‍💻 ✅ and tabs\tand\nnewlines\n\n 1234567 3.14159",
]


def training_text(max_chars: int) -> str:
    """English prose for training tokenizers; fails loudly rather than train on nothing."""
    from edge_runtime.sample_text import python_docs_text

    text = python_docs_text(max_chars)
    if len(text.split()) < 10_000:
        raise RuntimeError(f"the tokenizer corpus holds only {len(text.split())} words; expected tens of thousands")
    return text


def train_tokenizer(vocab_size: int = 1024):
    """A byte-level BPE tokenizer (tokenizers.Tokenizer) with Llama 3's split rules."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = training_text(300_000).splitlines() + UNICODE_LINES * 20
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(PLAIN_ADDED_TOKEN, special=False, normalized=False)])
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))],
    )
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    """Write tokenizer.json and a tokenizer_config.json that carries the chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[0], "eos_token": SPECIAL_TOKENS[1], "pad_token": SPECIAL_TOKENS[1],
        "chat_template": CHAT_TEMPLATE, "model_max_length": 256, "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_llama(folder: Path, tok, *, hidden: int = 64, ffn: int = 192, layers: int = 2,
                     heads: int = 4, kv_heads: int = 2, dtypes: tuple[str, ...] = ("f32",),
                     seed: int = 0, shard_bytes: int = 200_000, family: str = "llama") -> dict[str, Path]:
    """Random decoder + tokenizer saved as sharded safetensors, one folder per dtype.

    ``family``: "llama" (LlamaForCausalLM), "mistral" (MistralForCausalLM) or "qwen2"
    (Qwen2ForCausalLM, with its q/k/v biases).
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    config_cls = getattr(transformers, f"{names}Config")
    model_cls = getattr(transformers, f"{names}ForCausalLM")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    config = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, bos_token_id=tok.token_to_id(SPECIAL_TOKENS[0]),
        eos_token_id=tok.token_to_id(SPECIAL_TOKENS[1]), tie_word_embeddings=False,
        initializer_range=0.1,  # wider than the 0.02 default so logits (and greedy picks) are distinct
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random norms and biases, so a mapping mistake cannot hide behind 1s and 0s
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.uniform_(-0.2, 0.2)
    torch_dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    out = {}
    for name in dtypes:
        target = folder / name
        model.to(torch_dtypes[name]).save_pretrained(target, max_shard_size=shard_bytes)
        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id).save_pretrained(target)
        save_tokenizer(tok, target)
        out[name] = target
    return out


PRE_TOKENIZER_RULES = ("smollm", "gpt2", "qwen2", "llama3")


def smollm2_tokenizer(rules: str = "smollm"):
    """SmolLM2's tokenizer rebuilt from the embedded GGUF's tokens and merges, with ``rules``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from edge_runtime.formats.gguf import read_gguf_header
    from edge_runtime.models.spec import resolve_model

    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")
    header = read_gguf_header(resolve_model("smollm2"), keep_arrays=keys)
    tokens, merges, types = (header.get(k).values for k in keys)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ")) for m in merges], ignore_merges=rules == "llama3"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=rules in ("smollm", "gpt2"))
    split = LLAMA3_SPLIT if rules == "llama3" else LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
    tok.pre_tokenizer = {
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "gpt2": byte_level,
    }.get(rules) or pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    control = 3  # gguf TokenType.CONTROL
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i, kind in enumerate(types) if kind == control])
    return tok, header.chat_template


def write_random_llama(folder: Path, vocab: int, write_tokenizer: Callable[[Path], None], *,
                       hidden: int = 64, layers: int = 1, seed: int = 0) -> Path:
    """A random tied-embedding Llama written with numpy alone (float16 safetensors, one shard).

    ``write_tokenizer(folder)`` adds the tokenizer files (and tokenizer_config.json).
    """
    import numpy as np
    from safetensors.numpy import save_file

    heads, head_dim, ffn = 4, hidden // 4, hidden * 2
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float16)

    weights = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": rand(hidden) + 1}
    for b in range(layers):
        p = f"model.layers.{b}."
        weights.update({
            p + "input_layernorm.weight": rand(hidden) + 1, p + "post_attention_layernorm.weight": rand(hidden) + 1,
            p + "self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": rand(heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": rand(ffn, hidden), p + "mlp.up_proj.weight": rand(ffn, hidden),
            p + "mlp.down_proj.weight": rand(hidden, ffn),
        })
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    write_tokenizer(folder)
    return folder


def write_smollm2_tokenizer(tok, chat_template: str | None) -> Callable[[Path], None]:
    """Writer of a SmolLM2-style tokenizer.json + tokenizer_config.json."""

    def write(folder: Path) -> None:
        tok.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
                  "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
                  "clean_up_tokenization_spaces": False, "model_max_length": 8192}
        if chat_template:
            config["chat_template"] = chat_template
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")

    return write


def train_sentencepiece(folder: Path, vocab_size: int = 800, *, dummy_prefix: bool = True) -> None:
    """A SentencePiece BPE ``tokenizer.model`` as Llama 2 / Mistral ship it (byte fallback, digits
    split, whitespace kept), with a LlamaTokenizer tokenizer_config.json. ``dummy_prefix=False``
    gives Gemma's behaviour (no "▁" prepended to the text)."""
    import io

    import sentencepiece as spm

    text = training_text(200_000).splitlines()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text + UNICODE_LINES * 20), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_tiny_gemma3(folder: Path, *, hidden: int = 64, layers: int = 3, window: int = 4) -> Path:
    """Random Gemma3ForCausalLM (sliding-window layers, q/k norms) with a Gemma-style SentencePiece
    tokenizer, float32, sharded. Layer types: sliding, full, sliding; window of ``window`` tokens."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    train_sentencepiece(folder, dummy_prefix=False)
    heads, head_dim = 4, hidden // 4
    config = Gemma3TextConfig(
        vocab_size=800, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=1, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        sliding_window=window, layer_types=["full_attention" if i % 3 == 1 else "sliding_attention"
                                            for i in range(layers)],
        max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1,
    )
    torch.manual_seed(3)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma norms scale by (1 + w): random w around 0
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(-0.5, 0.5)
    model.save_pretrained(folder, max_shard_size=100_000)
    return folder


def _cached(request: pytest.FixtureRequest, key: str, build) -> Path:
    """A folder under the pytest cache built once by ``build(tmp_folder)``, then reused."""
    root = Path(request.config.cache.mkdir(f"edgert-tiny-models-{TINY_MODELS_VERSION}"))
    done = root / key
    if (done / "complete").is_file():
        return done
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        build(tmp)
        (tmp / "complete").write_text("ok")
        try:
            os.rename(tmp, done)
        except OSError:  # another session finished first; keep theirs
            if not (done / "complete").is_file():
                shutil.rmtree(done, ignore_errors=True)
                os.rename(tmp, done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(request: pytest.FixtureRequest) -> Path:
    """Only the tokenizer files of the tiny models."""
    return _cached(request, "tokenizer", lambda d: save_tokenizer(train_tokenizer(), d))


@pytest.fixture(scope="session")
def tiny_llama_dtype_dirs(request: pytest.FixtureRequest, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """The tiny Llama saved in f32, f16 and bf16 (same weights, rounded)."""
    from tokenizers import Tokenizer

    def build(folder: Path) -> None:
        tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
        build_tiny_llama(folder, tok, dtypes=("f32", "f16", "bf16"))

    root = _cached(request, "llama-h64", build)
    return {name: root / name for name in ("f32", "f16", "bf16")}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_llama_dtype_dirs: dict[str, Path]) -> Path:
    """The tiny float32 Llama: the HF folder every converter test starts from."""
    return tiny_llama_dtype_dirs["f32"]


@pytest.fixture(scope="session")
def tiny_family_dirs(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_tokenizer_dir: Path) -> dict[str, Path]:
    """Float32 tiny models per family: {"llama": ..., "mistral": ..., "qwen2": ...}."""
    from tokenizers import Tokenizer

    def build(folder: Path) -> None:
        tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
        for family in ("mistral", "qwen2"):
            build_tiny_llama(folder / family, tok, family=family, seed=2)

    root = _cached(request, "families-h64", build)
    return {"llama": tiny_llama_dir, "mistral": root / "mistral" / "f32", "qwen2": root / "qwen2" / "f32"}


@pytest.fixture(scope="session")
def tiny_llama_256_dir(request: pytest.FixtureRequest, tiny_tokenizer_dir: Path) -> Path:
    """A tiny Llama whose rows are multiples of 256 (hidden 256, FFN 512), float32."""
    from tokenizers import Tokenizer

    def build(folder: Path) -> None:
        tok = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
        build_tiny_llama(folder, tok, hidden=256, ffn=512, heads=4, kv_heads=2, seed=1)

    return _cached(request, "llama-h256", build) / "f32"


@pytest.fixture(scope="session")
def smollm2_vocab_dirs(request: pytest.FixtureRequest) -> dict[str, Path]:
    """Tiny random Llamas with SmolLM2's real vocabulary under each pre-tokenizer rule set."""

    def build(folder: Path) -> None:
        for rules in PRE_TOKENIZER_RULES:
            tok, template = smollm2_tokenizer(rules)
            write_random_llama(folder / rules, tok.get_vocab_size(with_added_tokens=True),
                               write_smollm2_tokenizer(tok, template))

    root = _cached(request, "smollm2-vocab", build)
    return {rules: root / rules for rules in PRE_TOKENIZER_RULES}


@pytest.fixture(scope="session")
def tiny_gemma3_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny random Gemma 3 (3 layers, sliding window 4) with a Gemma-style SentencePiece tokenizer."""
    pytest.importorskip("sentencepiece")
    return _cached(request, "gemma3-h64", build_tiny_gemma3)


@pytest.fixture(scope="session")
def spm_llama_dir(request: pytest.FixtureRequest) -> Path:
    """A tiny random Llama with a SentencePiece ``tokenizer.model`` (no tokenizer.json)."""
    pytest.importorskip("sentencepiece")
    return _cached(request, "llama-spm", lambda d: write_random_llama(d, 800, train_sentencepiece))
