"""The Hugging Face tokenizer files an ONNX or TFLite artifact carries beside its model."""

from __future__ import annotations

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
