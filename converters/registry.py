"""Which converter handles which Hugging Face architecture, per output format.

Converters register themselves with a decorator naming the architectures they accept
(``@register_converter("gguf", "LlamaForCausalLM", "MistralForCausalLM")``); the table below says
which module holds a format's converters, so asking about one format imports only that module.
The registry is filled once, at import of those modules, and only read afterwards.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TypeVar

from edge_runtime.errors import UnsupportedModelError

# format -> modules whose import registers that format's converters
MODULES: dict[str, tuple[str, ...]] = {
    "gguf": ("edge_runtime.converters.gguf_arch",),
    "tflite": ("edge_runtime.converters.tflite_config",),
}

_registered: dict[tuple[str, str], type] = {}

C = TypeVar("C", bound=type)


def register_converter(fmt: str, *architectures: str) -> Callable[[C], C]:
    """Class decorator: this converter turns these HF architectures into ``fmt`` artifacts."""

    def decorate(cls: C) -> C:
        for arch in architectures:
            taken = _registered.get((fmt, arch))
            if taken is not None and taken is not cls:
                raise ValueError(f"{arch} already has a {fmt} converter: {taken.__name__}")
            _registered[(fmt, arch)] = cls
        cls.architectures = tuple(architectures)  # type: ignore[attr-defined]
        return cls

    return decorate


def _load(fmt: str) -> None:
    if fmt not in MODULES:
        raise UnsupportedModelError(f"unknown output format {fmt!r}", f"formats: {', '.join(MODULES)}")
    for module in MODULES[fmt]:
        importlib.import_module(module)


def supported_architectures(fmt: str = "gguf") -> list[str]:
    """The HF ``architectures`` names that convert to ``fmt``, sorted."""
    _load(fmt)
    return sorted(arch for (f, arch) in _registered if f == fmt)


def converter_for(fmt: str, architecture: str) -> type:
    """The converter class for one HF architecture; a clear error listing the supported ones."""
    _load(fmt)
    cls = _registered.get((fmt, architecture))
    if cls is None:
        raise UnsupportedModelError(
            f"architecture {architecture!r} cannot be converted to {fmt.upper()}",
            f"supported: {', '.join(supported_architectures(fmt))}",
        )
    return cls
