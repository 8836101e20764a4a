"""Naming a BPE tokenizer's pre-tokenizer the way llama.cpp expects (``tokenizer.ggml.pre``).

llama.cpp re-implements each known pre-tokenizer (the regex that splits text before BPE merges)
and picks one by the name in the GGUF file. Its converter finds that name by tokenizing a fixed
text and hashing the ids: the ids depend on both the split rules and the vocabulary, so a hash
identifies a published tokenizer exactly. We do the same for the tokenizers of the families we
convert. A tokenizer with a new vocabulary (one trained for a small model, say) has no published
hash; for it we read the split rules themselves from tokenizer.json and accept the few layouts
whose llama.cpp implementation is known to match, and refuse anything else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from edge_runtime.errors import UnsupportedModelError

# The fixed text llama.cpp's converter tokenizes (mixed whitespace, emoji with joiners, digit
# runs, Khmer, CJK, Cyrillic, quotes and contractions): sha256 of its UTF-8 is CHECK_TEXT_SHA256.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n\U0001f680 (normal) "
    "\U0001f636\u200d\U0001f32b\ufe0f (multiple emojis concatenated) \u2705 \U0001f999\U0001f999 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "\u1780\u17b6\u1793\u17cb\u178f\u17c2\u1796\u17b7\u179f\u17c1\u179f\u17a2\u17b6\u1785\U0001f601 "
    "?\u6211\u60f3\u5728apple\u5de5\u4f5c1314151\u5929\uff5e ------======= "
    "\u043d\u0435\u0449\u043e \u043d\u0430 \u0411\u044a\u043b\u0433\u0430\u0440\u0441\u043a\u0438 "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? "
    "'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
CHECK_TEXT_SHA256 = "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"

# sha256(str(ids of CHECK_TEXT)) -> llama.cpp pre-tokenizer name, for published tokenizers of
# the Llama/Mistral/Qwen2 families (values from llama.cpp's converter table).
KNOWN_HASHES: dict[str, str] = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM/SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5/2/2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3 embedding
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
}

# The split regexes as tokenizer.json writes them (Llama 3 groups digits by three, Qwen2 by one).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# Split rules (normalized, see _rules) -> (llama.cpp name, whether llama.cpp ignores merges for
# whole words under that name, which the HF tokenizer must then do too).
KNOWN_RULES: dict[tuple[tuple[Any, ...], ...], tuple[str, bool]] = {
    (("split", LLAMA3_REGEX), ("bytelevel", False)): ("llama-bpe", True),
    (("split", QWEN2_REGEX), ("bytelevel", False)): ("qwen2", False),
    (("bytelevel", True),): ("gpt-2", False),
    (("digits", True), ("bytelevel", True)): ("smollm", False),
}


def check_hash(ids: list[int]) -> str:
    """The hash llama.cpp keys its pre-tokenizer table by: sha256 of the ids' Python repr."""
    return hashlib.sha256(str(list(ids)).encode()).hexdigest()


def _rules(pre: Any) -> tuple[tuple[Any, ...], ...] | None:
    """A pre_tokenizer JSON reduced to what decides the split (offsets trimming does not)."""
    if not isinstance(pre, dict):
        return None
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    out: list[tuple[Any, ...]] = []
    for step in steps or []:
        kind = step.get("type")
        if kind == "ByteLevel" and not step.get("add_prefix_space", False):
            out.append(("bytelevel", bool(step.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("digits", bool(step.get("individual_digits", False))))
        elif (kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert")
              and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]):
            out.append(("split", step["pattern"]["Regex"]))
        else:
            return None
    return tuple(out)


def detect_pre_tokenizer(check_ids: list[int], tokenizer_json: dict[str, Any], where: str) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a clear error.

    ``check_ids`` are the ids the HF tokenizer gives for ``CHECK_TEXT`` (special tokens added,
    as ``transformers``' ``encode`` does).
    """
    known = KNOWN_HASHES.get(check_hash(check_ids))
    if known is not None:
        return known
    model = tokenizer_json.get("model") or {}
    normalizer = tokenizer_json.get("normalizer")
    rules = _rules(tokenizer_json.get("pre_tokenizer"))
    match = KNOWN_RULES.get(rules) if rules is not None else None
    if match is not None:
        name, ignores_merges = match
        allowed_norm = (None, "NFC") if name == "qwen2" else (None,)
        norm_type = normalizer.get("type") if isinstance(normalizer, dict) else None
        if norm_type in allowed_norm and bool(model.get("ignore_merges", False)) == ignores_merges:
            return name
    shown = json.dumps(tokenizer_json.get("pre_tokenizer"))[:200]
    raise UnsupportedModelError(
        f"{where}: unknown BPE pre-tokenizer (check hash {check_hash(check_ids)[:16]}..., "
        f"rules {shown})",
        "llama.cpp would split text differently from transformers; supported: "
        + ", ".join(sorted({n for n, _ in KNOWN_RULES.values()} | set(KNOWN_HASHES.values()))),
    )
