"""The manifest: ``manifest.json`` beside a model's artifacts (a convert output or a store entry).

One JSON document: schema version, the model's name, where it came from (and that source's
hash), the tools that built it, every artifact (file, format, quant, size, sha256, arch,
parameters, context, quality, profiles, and how it was built), and a ``reference``: fixed
prompts with the greedy continuation of the unquantized artifact.

A manifest is checked whole before anything in it is used: the JSON, the schema, every field's
type, file names that stay inside the folder, and a ``digest`` over the document itself, so a
hand-edited or damaged manifest is reported instead of trusted. ``verify_manifest`` goes further
and re-hashes every artifact file.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_runtime.errors import InvalidConfigError
from edge_runtime.files import atomic_write, file_sha256, parse_json, read_regular_file
from edge_runtime.models.artifact import Artifact

MANIFEST_NAME = "manifest.json"
SCHEMA = "edge-runtime.manifest"
SCHEMA_VERSION = 1
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FORMATS = ("gguf", "tflite", "onnx")
_HINT = "rebuild it with `edgert convert`, or re-add the model with `edgert models add`"
MANIFEST_MAX_BYTES = 16 << 20  # a manifest of many artifacts is tens of KB


@dataclass(frozen=True)
class ManifestArtifact:
    """One artifact as the manifest records it: a file beside the manifest and how it was made."""

    file: str  # relative to the manifest's folder
    format: str
    quant: str | None
    size_bytes: int
    sha256: str
    arch: str | None = None
    n_params: int | None = None
    n_ctx_train: int | None = None
    role: str = "quantized"  # "base" (the unquantized reference) or "quantized"
    quality: dict[str, Any] | None = field(default=None, hash=False)
    profiles: tuple[str, ...] = ()
    build: dict[str, Any] = field(default_factory=dict, hash=False)  # source hash + settings
    fallbacks: tuple[str, ...] = ()  # tensors the quantizer kept in another type, and why

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file, "format": self.format, "quant": self.quant,
            "size_bytes": self.size_bytes, "sha256": self.sha256, "arch": self.arch,
            "n_params": self.n_params, "n_ctx_train": self.n_ctx_train, "role": self.role,
            "quality": self.quality, "profiles": list(self.profiles), "build": self.build,
            "fallbacks": list(self.fallbacks),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ManifestArtifact:
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in data.items() if k in known}
        kwargs["profiles"] = tuple(kwargs.get("profiles") or ())
        kwargs["build"] = dict(kwargs.get("build") or {})
        kwargs["fallbacks"] = tuple(kwargs.get("fallbacks") or ())
        return cls(**kwargs)

    def to_artifact(self, folder: Path, model: str, source: str | None) -> Artifact:
        """The runtime's view: an ``Artifact`` with an absolute path."""
        return Artifact(
            path=str(folder / self.file), format=self.format, name=model, quant=self.quant,
            size_bytes=self.size_bytes, arch=self.arch, n_params=self.n_params,
            n_ctx_train=self.n_ctx_train, sha256=self.sha256, source=source,
            quality=self.quality, profiles=self.profiles,
        )


@dataclass(frozen=True)
class Manifest:
    """A model's manifest; ``folder`` is where it was read from (not part of the JSON)."""

    model: str
    source: dict[str, Any]
    tools: dict[str, Any]
    artifacts: tuple[ManifestArtifact, ...]
    evaluation: dict[str, Any] | None = field(default=None, hash=False)
    reference: dict[str, Any] | None = field(default=None, hash=False)
    complete: bool = True
    created: str | None = None
    folder: Path | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        body = {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "model": self.model,
            "complete": self.complete, "created": self.created, "source": self.source,
            "tools": self.tools, "evaluation": self.evaluation,
            "artifacts": [a.to_dict() for a in self.artifacts], "reference": self.reference,
        }
        return {**body, "digest": _digest(body)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, folder: Path | None = None) -> Manifest:
        return cls(
            model=data["model"], source=dict(data.get("source") or {}), tools=dict(data.get("tools") or {}),
            artifacts=tuple(ManifestArtifact.from_dict(a) for a in data["artifacts"]),
            evaluation=data.get("evaluation"), reference=data.get("reference"),
            complete=bool(data.get("complete", True)), created=data.get("created"), folder=folder,
        )

    def runtime_artifacts(self) -> list[Artifact]:
        """Every artifact with an absolute path, in manifest order."""
        folder = self.folder or Path(".")
        source = self.source.get("name") or self.source.get("path")
        return [a.to_artifact(folder, self.model, source) for a in self.artifacts]

    def find(self, file: str) -> ManifestArtifact | None:
        return next((a for a in self.artifacts if a.file == file), None)


def _digest(body: dict[str, Any]) -> str:
    """sha256 of the document's canonical JSON (sorted keys, no spaces), ``digest`` left out."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def manifest_json(manifest: Manifest) -> str:
    """The manifest as the text written to disk."""
    return json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n"


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` atomically; returns its path."""
    return atomic_write(Path(folder) / MANIFEST_NAME, manifest_json(manifest))


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def read_manifest(folder: str | Path, *, check_files: bool = True) -> Manifest:
    """Read and validate ``folder/manifest.json``; raises ``InvalidConfigError`` on any flaw.

    ``check_files`` also checks that every artifact file exists with its recorded size (cheap;
    the sha256 is checked by ``verify_manifest``).
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.exists() and not path.is_symlink():
        raise InvalidConfigError(f"{folder}: no {MANIFEST_NAME} here", "convert a model into it with `edgert convert`")
    data = parse_json(read_regular_file(path, MANIFEST_MAX_BYTES, "manifest"), str(path), _HINT)
    validate_manifest(data, str(path))
    manifest = Manifest.from_dict(data, folder=folder)
    if check_files:
        for a in manifest.artifacts:
            file = folder / a.file
            if not file.exists():
                raise InvalidConfigError(f"{path}: artifact {a.file} is missing", _HINT)
            size = _size(file)
            if size != a.size_bytes:
                raise InvalidConfigError(
                    f"{path}: {a.file} is {size} bytes, the manifest says {a.size_bytes}", _HINT)
    return manifest


def _size(file: Path) -> int:
    if file.is_dir():  # an ONNX folder
        return sum(p.stat().st_size for p in file.rglob("*") if p.is_file())
    return file.stat().st_size


def validate_manifest(data: Any, where: str) -> None:
    """Check a parsed manifest document; the message names the first flaw found."""

    def fail(what: str) -> None:
        raise InvalidConfigError(f"{where}: {what}", _HINT)

    if not isinstance(data, dict):
        fail("not a manifest (the document is not a JSON object)")
    if data.get("schema") != SCHEMA:
        fail(f"not an edge-runtime manifest (its schema is not {SCHEMA})")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        fail("schema_version is missing")
    if version > SCHEMA_VERSION:
        raise InvalidConfigError(f"{where}: schema version {version} is newer than this edge-runtime "
                                 f"reads ({SCHEMA_VERSION})", "upgrade edge-runtime")
    if version != SCHEMA_VERSION:
        fail(f"unknown schema version {version}")
    body = {k: v for k, v in data.items() if k != "digest"}
    if data.get("digest") != _digest(body):
        fail("its digest does not match its content: it was edited by hand or damaged")
    if not isinstance(data.get("model"), str) or not data["model"]:
        fail("model: expected a name")
    for key in ("source", "tools"):
        if not isinstance(data.get(key), dict):
            fail(f"{key}: expected an object")
    for key in ("evaluation", "reference"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            fail(f"{key}: expected an object or null")
    artifacts = data.get("artifacts")
    if not isinstance(artifacts, list):
        fail("artifacts: expected a list")
    seen: set[str] = set()
    for i, entry in enumerate(artifacts):
        _validate_artifact(entry, f"artifacts[{i}]", fail)
        if entry["file"] in seen:
            fail(f"artifacts[{i}]: its file is listed twice")
        seen.add(entry["file"])


def _validate_artifact(entry: Any, label: str, fail: Any) -> None:
    if not isinstance(entry, dict):
        fail(f"{label}: expected an object")
    file = entry.get("file")
    if not isinstance(file, str) or not file or "/" in file or "\\" in file or file in (".", ".."):
        fail(f"{label}.file: expected a file name beside the manifest")
    if entry.get("format") not in _FORMATS:
        fail(f"{label}.format: expected one of {', '.join(_FORMATS)}")
    size = entry.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        fail(f"{label}.size_bytes: expected a byte count")
    if not isinstance(entry.get("sha256"), str) or not _SHA256.match(entry["sha256"]):
        fail(f"{label}.sha256: expected 64 lowercase hex digits")
    for key in ("quant", "arch"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            fail(f"{label}.{key}: expected a string")
    for key in ("n_params", "n_ctx_train"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            fail(f"{label}.{key}: expected a count")
    if entry.get("role") not in ("base", "quantized"):
        fail(f"{label}.role: expected base or quantized")
    if entry.get("quality") is not None and not isinstance(entry["quality"], dict):
        fail(f"{label}.quality: expected an object or null")
    kv = (entry.get("quality") or {}).get(KV_COSTS_KEY)
    if kv is not None and (not isinstance(kv, dict) or not all(_is_kv_cost(c) or _is_kv_unsupported(c)
                                                               for c in kv.values())):
        fail(f"{label}.quality.{KV_COSTS_KEY}: expected an object of KV types, each with a finite kld "
             "or why it is unsupported")
    profiles = entry.get("profiles", [])
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        fail(f"{label}.profiles: expected a list of profile ids")
    if not isinstance(entry.get("build", {}), dict):
        fail(f"{label}.build: expected an object")
    fallbacks = entry.get("fallbacks", [])
    if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
        fail(f"{label}.fallbacks: expected a list of strings")


# quality[KV_COSTS_KEY]: what each quantized KV cache type costs this artifact, measured by the
# evaluator against an f16 cache on the same windows: {"q8_0": {"kld": 0.001, "top1_agreement": 0.99}},
# or {"q4_0": {"unsupported": "why"}} where llama.cpp cannot make a context with that type.
KV_COSTS_KEY = "kv_cache_types"


def _is_kv_unsupported(cost: Any) -> bool:
    return isinstance(cost, dict) and isinstance(cost.get("unsupported"), str)


def _is_kv_cost(cost: Any) -> bool:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0

    return isinstance(cost, dict) and number(cost.get("kld")) and (
        cost.get("top1_agreement") is None or number(cost["top1_agreement"]))


def kv_cache_unsupported(quality: dict[str, Any] | None) -> dict[str, str]:
    """The KV cache types the evaluator found llama.cpp cannot use with this artifact, and why."""
    found = (quality or {}).get(KV_COSTS_KEY)
    if not isinstance(found, dict):
        return {}
    return {str(kv): cost["unsupported"] for kv, cost in found.items() if _is_kv_unsupported(cost)}


def kv_cache_costs(quality: dict[str, Any] | None) -> dict[str, dict[str, float]]:
    """The measured cost of each KV cache type (``kld``, ``top1_agreement``) in an artifact's quality;
    entries that are not well formed are left out (an artifact described without a manifest has none)."""
    found = (quality or {}).get(KV_COSTS_KEY)
    if not isinstance(found, dict):
        return {}
    return {str(kv): cost for kv, cost in found.items() if _is_kv_cost(cost)}


@dataclass(frozen=True)
class FileCheck:
    """The outcome of re-hashing one artifact."""

    file: str
    status: str  # "ok", "mismatch", "missing", "size"
    expected: str
    actual: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "status": self.status, "expected": self.expected, "actual": self.actual}


def verify_manifest(manifest: Manifest) -> list[FileCheck]:
    """Re-hash every artifact of a manifest read with ``read_manifest``."""
    folder = manifest.folder or Path(".")
    checks = []
    for a in manifest.artifacts:
        path = folder / a.file
        if not path.exists():
            checks.append(FileCheck(a.file, "missing", a.sha256))
            continue
        size = _size(path)
        if size != a.size_bytes:
            checks.append(FileCheck(a.file, "size", f"{a.size_bytes} bytes", f"{size} bytes"))
            continue
        actual = folder_sha256(path) if path.is_dir() else file_sha256(path)
        checks.append(FileCheck(a.file, "ok" if actual == a.sha256 else "mismatch", a.sha256, actual))
    return checks


def folder_sha256(folder: Path) -> str:
    """One hash for a folder artifact (ONNX): each file's relative path and sha256, sorted."""
    digest = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        digest.update(f"{p.relative_to(folder).as_posix()}\0{file_sha256(p)}\n".encode())
    return digest.hexdigest()
