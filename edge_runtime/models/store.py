"""Where models live: the embedded ones shipped by PyPI packages, and the user's model store.

The store is ``home()/models/<name>/``: one folder per model name holding its artifacts and a
``manifest.json`` (see ``manifest.py``). ``add`` stages a new entry in a hidden folder beside the
others and renames it into place, so an entry is either all there or not there. Artifact files
are hard-linked when the source is on the same filesystem (a convert output is then stored
without a second copy: our writers only ever replace files by rename, which breaks the link
instead of changing the stored bytes), and copied otherwise, hashing as they go.

What a ``--model`` value names (a file, a folder, a store name, an embedded model) is worked out
in ``model_spec.py``.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.errors import InvalidConfigError, InvalidModelFileError, ModelNotFoundError
from edge_runtime.files import file_sha256, replace_folder
from edge_runtime.formats.gguf import describe_gguf
from edge_runtime.formats.tflite import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, sidecar_path
from edge_runtime.models.artifact import FLOAT_TYPES, artifact_from_gguf
from edge_runtime.models.embedded import EMBEDDED, chunks_size, find_embedded, installed_file
from edge_runtime.models.locations import home, store_root, writable_folder
from edge_runtime.models.manifest import (
    Manifest,
    ManifestArtifact,
    has_manifest,
    read_manifest,
    verify_manifest,
    write_manifest,
)

if TYPE_CHECKING:
    from edge_runtime.models.manifest import FileCheck, Manifest

DEFAULT_MODEL = "smollm2"
__all__ = ["list_models", "add_model", "remove_model", "verify_model"]


_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


def model_slug(text: str) -> str:
    """A store name from a model or file name: lowercase, runs of other characters become '-'."""
    slug = re.sub(r"[^a-z0-9._]+", "-", text.lower()).strip("-._")
    return slug[:100] or "model"


def is_store_name(name: str) -> bool:
    """Whether ``name`` is spelled like a store entry (it may still not exist)."""
    return bool(_NAME.match(name))


def check_name(name: str) -> str:
    """``name`` if it is a valid store name, else ``InvalidConfigError``."""
    if not _NAME.match(name) or find_embedded(name) is not None:
        why = "is an embedded model's name" if find_embedded(name) else "is not a valid name"
        raise InvalidConfigError(f"{name!r} {why} for the store",
                                 "use lowercase letters, digits, '.', '_' and '-' (--name NAME)")
    return name


def store_names() -> list[str]:
    """Every stored model name, sorted (hidden staging folders left out)."""
    root = store_root()
    try:
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise InvalidConfigError(f"{root}: cannot read the model store ({exc.strerror or exc})",
                                 f"check the permissions of {home()}, or set EDGERT_HOME") from None


def open_model(name: str, *, check_files: bool = True) -> Manifest:
    """The manifest of a stored model; a damaged entry raises ``InvalidConfigError``."""
    folder = store_root() / name
    if not _NAME.match(name) or not folder.is_dir():
        raise ModelNotFoundError(f"no model named {name!r} in the store", "see `edgert models list`")
    return read_manifest(folder, check_files=check_files)


def _lock_store() -> object:
    """An exclusive lock on the store while it changes (released when the file is closed)."""
    root = writable_folder(store_root())
    handle = open(root / ".lock", "a+b")  # noqa: SIM115 (held open on purpose)
    try:
        import fcntl

        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except ImportError:  # Windows: no advisory locks; concurrent adds are the user's risk there
        pass
    for stale in root.glob(".staging-*"):  # left by an add that was killed
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".trash-*"):
        _restore_replaced(stale)
        shutil.rmtree(stale, ignore_errors=True)
    return handle


def _restore_replaced(trash: Path) -> None:
    """Put back an entry that ``replace_folder`` moved aside when the add was killed before the
    new entry took its place (the trash holds ``old``; ``remove_model``'s trash never does)."""
    name = trash.name[len(".trash-"):-9]  # mkdtemp adds "-" + 8 random characters
    old, entry = trash / "old", trash.parent / name
    if old.is_dir() and _NAME.match(name) and not entry.exists():
        os.replace(old, entry)


def add_model(src: str | Path, *, name: str | None = None, link: bool = True, verify: bool = True) -> Manifest:
    """Add a GGUF file, or a folder holding a manifest (a convert output), to the store.

    Every artifact is checked against its sha256 before the entry appears (``verify=False`` is for
    a caller that has just hashed them itself); an entry of the same name is replaced as a whole.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        if not has_manifest(path):
            raise InvalidConfigError(f"{path}: a folder without a manifest.json",
                                     "add a .gguf file, or a folder written by `edgert convert`")
        manifest = read_manifest(path)
        bad = [c for c in verify_manifest(manifest) if not c.ok] if verify else []
        if bad:
            raise InvalidConfigError(f"{path}: {bad[0].file} does not match its manifest ({bad[0].status})",
                                     "rebuild it with `edgert convert`")
    elif path.is_file():
        manifest = _manifest_for_file(path)
    else:
        raise ModelNotFoundError(f"{path}: no such file or folder")
    name = check_name(name or model_slug(manifest.model))
    root = store_root()
    handle = _lock_store()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{name}-", dir=root))
        try:
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(staging, 0o777 & ~mask)  # mkdtemp's 0700 would hide the entry from other users
            companions: set[str] = set()
            for a in manifest.artifacts:
                _place(manifest.folder / a.file, staging / a.file, a.sha256, link=link)  # type: ignore[operator]
                companions.update(_companion_names(manifest.folder / a.file, a.format))  # type: ignore[operator]
            for extra in sorted(companions - {a.file for a in manifest.artifacts}):
                _place_companion(manifest.folder / extra, staging / extra, link=link)  # type: ignore[operator]
            stored = Manifest.from_dict({**manifest.to_dict(), "model": name}, folder=staging)
            write_manifest(staging, stored)
            replace_folder(staging, root / name)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        handle.close()  # type: ignore[attr-defined]
    return open_model(name)


def _manifest_for_file(path: Path) -> Manifest:

    if path.suffix.lower() != ".gguf":
        raise InvalidModelFileError(f"{path}: only .gguf files can be added on their own",
                                    "add a folder written by `edgert convert` for other formats")
    art = artifact_from_gguf(path)
    digest = file_sha256(path)
    entry = ManifestArtifact(
        file=path.name, format="gguf", quant=art.quant, size_bytes=art.size_bytes, sha256=digest,
        arch=art.arch, n_params=art.n_params, n_ctx_train=art.n_ctx_train,
        role="base" if (art.quant or "").upper() in FLOAT_TYPES else "quantized",
    )
    return Manifest(model=art.name, source={"kind": "file", "path": str(path.resolve()), "sha256": digest},
                    tools={}, artifacts=(entry,), folder=path.parent)


def _place(src: Path, dst: Path, sha256: str, *, link: bool) -> None:
    """Hard-link ``src`` to ``dst`` where the filesystem allows it, else copy and check the hash.

    ``dst`` is inside the staging folder that ``replace_folder`` renames into place whole, so a
    plain write here is already atomic for readers of the store.
    """
    if src.is_dir():  # an ONNX folder: copy the tree (links would work too, copies are simpler)
        shutil.copytree(src, dst)
        return
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another filesystem, or links not allowed: copy
    digest = hashlib.sha256()
    with src.open("rb") as fin, dst.open("wb") as fout:
        while block := fin.read(1 << 22):
            digest.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    if digest.hexdigest() != sha256:
        raise InvalidModelFileError(f"{src}: changed while it was copied (sha256 differs)", "add it again")


def _companion_names(path: Path, fmt: str) -> list[str]:
    """Files beside an artifact that it needs to load (a .tflite's tokenizer and description)."""
    if fmt != "tflite":
        return []  # a GGUF holds everything; an ONNX folder is copied whole

    names = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, sidecar_path(path).name)
    return [n for n in names if (path.parent / n).is_file()]


def _place_companion(src: Path, dst: Path, *, link: bool) -> None:
    """Link or copy a file an artifact needs into the staging folder (atomic as ``_place`` is)."""
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def remove_model(name: str) -> Path:
    """Delete a stored model (its folder goes as a whole); returns where it was."""
    folder = store_root() / name
    if not _NAME.match(name) or not folder.is_dir():
        raise ModelNotFoundError(f"no model named {name!r} in the store", "see `edgert models list`")
    handle = _lock_store()
    try:
        trash = Path(tempfile.mkdtemp(prefix=f".trash-{name}-", dir=folder.parent))
        os.replace(folder, trash / name)
        shutil.rmtree(trash, ignore_errors=True)
    finally:
        handle.close()  # type: ignore[attr-defined]
    return folder


def verify_model(spec: str) -> tuple[Manifest, list[FileCheck]]:
    """Re-hash every artifact of a store entry (or a folder holding a manifest)."""
    path = Path(spec).expanduser()
    manifest = read_manifest(path, check_files=False) if path.is_dir() else open_model(spec, check_files=False)
    return manifest, verify_manifest(manifest)


@dataclass(frozen=True)
class ModelEntry:
    """One line of ``edgert models list``: an embedded model or one stored artifact."""

    name: str
    path: Path | None
    description: str
    size_bytes: int | None = None
    quant: str | None = None
    arch: str | None = None
    n_ctx_train: int | None = None
    n_params: int | None = None
    sha256: str | None = None
    kind: str = "embedded"  # "embedded" or "store"
    error: str | None = None  # why a stored entry cannot be used (damaged manifest, missing file)
    status: str = "ready"  # "ready", "joined on first use" (chunks not joined yet), "not installed", "damaged"

    def to_dict(self) -> dict[str, object]:
        return {**self.__dict__, "path": str(self.path) if self.path else None}


def list_models(*, with_sha256: bool = True) -> list[ModelEntry]:
    """Every model known by name: embedded ones (installed or not), then the store's artifacts.

    A damaged store entry is listed with its ``error``, never skipped or used.
    """
    entries = []
    for model in EMBEDDED:
        path = installed_file(model)
        joined_size = chunks_size(model) if path is None else None
        if joined_size is not None:  # listed from its parts: joining 250 MB is the first load's job
            entries.append(ModelEntry(model.name, None, model.description, size_bytes=joined_size,
                                      sha256=model.sha256, status="joined on first use"))
            continue
        if path is None:
            entries.append(ModelEntry(model.name, None, model.description, status="not installed"))
            continue
        info = describe_gguf(path)
        entries.append(ModelEntry(
            name=model.name, path=path, description=model.description,
            size_bytes=info.size_bytes, quant=info.quant, arch=info.arch,
            n_ctx_train=info.n_ctx_train, n_params=info.n_params,
            sha256=file_sha256(path) if with_sha256 else None,
        ))
    for name in store_names():
        try:
            manifest = open_model(name)
        except (InvalidConfigError, ModelNotFoundError) as exc:
            entries.append(ModelEntry(name, store_root() / name, "", kind="store", error=exc.message,
                                      status="damaged"))
            continue
        for a in manifest.artifacts:
            entries.append(ModelEntry(
                name=name, path=store_root() / name / a.file,
                description=f"{a.role}, from {manifest.source.get('name') or manifest.source.get('path') or '?'}",
                size_bytes=a.size_bytes, quant=a.quant, arch=a.arch, n_ctx_train=a.n_ctx_train,
                n_params=a.n_params, sha256=a.sha256, kind="store",
            ))
    return entries
