"""Artifact: one model file (or folder) in one format and quant, as a manifest records it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.formats.gguf import describe_gguf
from edge_runtime.formats.onnx import read_onnx_folder
from edge_runtime.formats.tflite import read_description, read_tflite_layout

FLOAT_TYPES = ("F32", "F16", "BF16")  # the unquantized GGUF types (quant names and tensor types)


@dataclass(frozen=True)
class Artifact:
    """A runnable model file and what is known about it without loading it."""

    path: str
    format: str  # "gguf", "tflite", "onnx"
    name: str
    quant: str | None = None
    size_bytes: int = 0
    arch: str | None = None
    n_params: int | None = None
    n_ctx_train: int | None = None
    sha256: str | None = None
    source: str | None = None
    quality: dict[str, Any] | None = field(default=None, hash=False)
    profiles: tuple[str, ...] = ()
    # A file still in the pieces a package ships it in: joined at ``path`` when first loaded.
    parts: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """``name quant`` for messages and tables."""
        return f"{self.name} {self.quant}" if self.quant else self.name

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = list(self.profiles)
        if self.parts:
            data["parts"] = list(self.parts)
        else:
            del data["parts"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Artifact:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["profiles"] = tuple(kwargs.get("profiles") or ())
        kwargs["parts"] = tuple(kwargs.get("parts") or ())
        return cls(**kwargs)


def artifact_from_gguf(path: str | Path, *, name: str | None = None, parts: tuple[str, ...] = (),
                       sha256: str | None = None) -> Artifact:
    """Describe a GGUF file from its header (checked against the file size, never loaded);
    ``parts``: the pieces the file is still in (see ``Artifact.parts``)."""
    info = describe_gguf(path, parts=parts)
    return Artifact(
        path=str(path), format="gguf", name=name or _short_name(Path(path), info.quant),
        quant=info.quant, size_bytes=info.size_bytes, arch=info.arch, n_params=info.n_params,
        n_ctx_train=info.n_ctx_train, sha256=sha256, parts=parts,
    )


def _short_name(path: Path, quant: str | None) -> str:
    stem = path.stem
    if quant and stem.lower().endswith(quant.lower()):
        stem = stem[: -len(quant)].rstrip(".-_")
    return stem


def artifact_from_onnx(folder: str | Path, *, name: str | None = None) -> Artifact:
    """Describe an ONNX folder (checked, never loaded) as an artifact."""
    info = read_onnx_folder(folder)
    stem = info.path.name
    if info.precision and stem.endswith(f"-{info.precision}-onnx"):
        stem = stem[: -len(f"-{info.precision}-onnx")]
    return Artifact(
        path=str(info.path), format="onnx", name=name or stem, quant=info.precision,
        size_bytes=info.size_bytes, arch=info.arch, n_params=info.n_params, n_ctx_train=info.max_length,
    )


def artifact_from_tflite(path: str | Path, *, name: str | None = None) -> Artifact:
    """Describe a .tflite file (checked, never loaded): its context is the exported KV length.

    quant, arch and the parameter count come from the converter's ``<file>.json`` when it is
    there; ``quant`` uses the type names of the profiles' ladders (``int8``, ``int4``, ``fp16``).
    """
    p = Path(path)
    layout = read_tflite_layout(p)
    description = read_description(p)
    quant = description.get("quant")
    stem = p.stem
    if isinstance(quant, str) and stem.endswith(quant):
        stem = stem[: -len(quant)].rstrip("-_.")
    n_params = description.get("n_params")
    return Artifact(
        path=str(p), format="tflite", name=name or stem, quant=quant if isinstance(quant, str) else None,
        size_bytes=layout.size_bytes, arch=str(description["arch"]) if description.get("arch") else None,
        n_params=int(n_params) if isinstance(n_params, int) else None, n_ctx_train=layout.kv_len,
    )
