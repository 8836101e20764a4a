"""What a GGUF file's header holds: its metadata and tensor table (``gguf.read_gguf_header`` reads it)."""

from __future__ import annotations

import collections
import functools
import importlib.util
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@functools.lru_cache(maxsize=1)
def gguf_constants() -> ModuleType:
    """The `gguf.constants` module, loaded without the rest of the `gguf` package.

    `import gguf.constants` runs gguf/__init__.py, which pulls in numpy, yaml and the writer
    (~0.2-0.3 s); constants.py alone needs only the standard library (~30 ms).
    """
    loaded = sys.modules.get("gguf.constants")
    if loaded is not None:
        return loaded
    spec = importlib.util.find_spec("gguf")  # locates the package without executing it
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(folder, "constants.py")
        if os.path.isfile(candidate):
            file_spec = importlib.util.spec_from_file_location("edge_runtime._gguf_constants", candidate)
            if file_spec is not None and file_spec.loader is not None:
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                return module
    import gguf.constants  # unusual layout (zipped, frozen): pay for the whole package

    return gguf.constants



@dataclass(frozen=True)
class GGUFArray:
    """A metadata array: its element type, length, and its values when small (else None)."""

    type: int  # a gguf.constants.GGUFValueType member
    length: int
    values: tuple[Any, ...] | None = None


@dataclass(frozen=True)
class GGUFTensor:
    """One entry of the tensor table; `shape` is in GGUF order (ne[0], the row length, first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    type_name: str
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    n_elements: int


@dataclass(frozen=True)
class GGUFHeader:
    """Everything in a GGUF file but the weights themselves."""

    path: str
    version: int
    file_size: int
    data_offset: int
    alignment: int
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensor, ...]

    @property
    def architecture(self) -> str:
        """`general.architecture` ("llama", "gemma3", ...), or "" when absent."""
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else ""

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value by its full key."""
        return self.metadata.get(key, default)

    def arch_key(self, suffix: str, default: Any = None) -> Any:
        """The architecture-scoped value `{arch}.{suffix}` (e.g. "attention.head_count_kv")."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)

    def tensor(self, name: str) -> GGUFTensor | None:
        """The tensor called `name`, or None."""
        return next((t for t in self.tensors if t.name == name), None)

    @property
    def n_params(self) -> int:
        """Number of weights (elements of every tensor)."""
        return sum(t.n_elements for t in self.tensors)

    @property
    def weights_bytes(self) -> int:
        """Bytes of tensor data, alignment padding excluded."""
        return sum(t.n_bytes for t in self.tensors)

    @property
    def n_vocab(self) -> int | None:
        """Vocabulary size from the tokenizer, `{arch}.vocab_size` or the embedding shape."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, GGUFArray):
            return tokens.length
        size = self.arch_key("vocab_size")
        if isinstance(size, int):
            return size
        embd = self.tensor("token_embd.weight")
        return embd.shape[-1] if embd is not None and len(embd.shape) >= 2 else None

    @property
    def file_type_name(self) -> str | None:
        """llama.cpp's name for the quantization ("Q4_1", "Q4_K_M"); guessed when unrecorded."""
        ftype = self.metadata.get("general.file_type")
        names = {int(m): m.name for m in gguf_constants().LlamaFileType}
        if isinstance(ftype, int) and ftype in names and names[ftype] != "GUESSED":
            name = names[ftype]
            return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
        # llama.cpp guesses the same way: the most common type among the matrices.
        counts = collections.Counter(t.type_name for t in self.tensors if len(t.shape) >= 2)
        return max(counts, key=counts.__getitem__) if counts else None

    @property
    def chat_template(self) -> str | None:
        """The model's own chat template (`tokenizer.chat_template`), if any."""
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None
