"""The steps ``build.py`` strings together: identify the source, describe an artifact, evaluate,
record the reference continuations, and own the output folder while a build runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError
from edge_runtime.models.artifact import FLOAT_TYPES
from edge_runtime.models.manifest import Manifest, ManifestArtifact
from edge_runtime.models.reference import reference_is_current

if TYPE_CHECKING:
    from edge_runtime.converters.build import BuildRequest

class TargetProfile(Protocol):
    """What a build needs of a device profile: planning's ``DeviceProfile`` is one (the CLI resolves
    ``--profile`` ids; converters never read profiles themselves)."""

    @property
    def id(self) -> str: ...

    @property
    def backends(self) -> tuple[str, ...]: ...

    def quant_ladder(self, fmt: str) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class BuildEvent:
    """Progress of one step, for a display: ``done`` of ``total`` units (bytes, tensors, windows)."""

    stage: str  # "hashing", "converting", "quantizing", "evaluating", "reference"
    label: str
    done: int
    total: int
    reused: bool = False
    finished: bool = False


class OutputFolder:
    """The build's folder, held for the build: one writer at a time, leftovers of killed runs swept."""

    LOCK_NAME = ".edgert-build.lock"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handle: Any = None

    def __enter__(self) -> OutputFolder:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.folder / self.LOCK_NAME, "a+b")
        try:
            import fcntl

            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass  # no advisory locks on this platform
        except OSError:
            self._handle.close()
            raise EdgeRuntimeError(f"another `edgert convert` is writing to {self.folder}",
                                   "wait for it to finish, or give a different --out") from None
        # Temporary files of a run that was killed (a clean interruption removes its own).
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def previous_manifest(self) -> tuple[Manifest | None, str | None]:
        """The manifest of an earlier run (to reuse what it built), or why it cannot be used."""
        from edge_runtime.models.manifest import has_manifest, read_manifest

        if not has_manifest(self.folder):
            return None, None
        try:
            return read_manifest(self.folder, check_files=False), None
        except InvalidConfigError as exc:
            return None, f"ignored the existing manifest ({exc.message}); everything is rebuilt"


def source_identity(src: Path) -> dict[str, Any]:
    """What the source is and its sha256 (the same hash the converter records)."""
    from edge_runtime.files import file_sha256
    from edge_runtime.formats.gguf import read_gguf_header

    if src.is_dir():
        from edge_runtime.converters import safetensors_source as st
        from edge_runtime.converters.hf_to_gguf import check_source

        info = check_source(src)
        return {"kind": "hf", "path": str(src.resolve()), "name": info.name,
                "sha256": st.hash_files(info.files, info.path), "architecture": info.hf_architecture,
                "type": info.source_dtype, "quantized": False}
    header = read_gguf_header(src)
    quantized = any(t.type_name not in FLOAT_TYPES for t in header.tensors if len(t.shape) >= 2)
    return {"kind": "gguf", "path": str(src.resolve()), "name": src.name, "sha256": file_sha256(src),
            "architecture": header.architecture, "type": header.file_type_name, "quantized": quantized}


def tool_versions(kind: str) -> dict[str, Any]:
    """The versions that decide what an artifact's bytes are."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    ours = installed("edge-runtime")
    converter = "hf_to_gguf" if kind == "hf" else "gguf_source (llama.cpp quantizer)"
    return {"edge_runtime": ours, "converter": f"{converter} {ours}",
            "llama_cpp_python": installed("llama-cpp-python"), "gguf": installed("gguf")}


def artifact_entry(path: Path, role: str, profiles: tuple[str, ...], build: dict[str, Any]) -> ManifestArtifact:
    """A manifest entry for a finished GGUF file, read from its header and hashed."""
    from edge_runtime.files import file_sha256
    from edge_runtime.formats.gguf import describe_gguf

    info = describe_gguf(path)
    return ManifestArtifact(
        file=path.name, format="gguf", quant=info.quant, size_bytes=info.size_bytes,
        sha256=file_sha256(path), arch=info.arch, n_params=info.n_params, n_ctx_train=info.n_ctx_train,
        role=role, quality=None, profiles=profiles, build=build,
    )


def evaluate_artifacts(
    entries: list[ManifestArtifact],
    previous: Manifest | None,
    key: dict[str, Any],
    request: BuildRequest,
    folder: Path,
    emit: Callable[[BuildEvent], None],
) -> list[ManifestArtifact]:
    """Entries with quality figures: reused where the files and settings match, else measured."""
    from dataclasses import replace

    from edge_runtime.converters.evaluate import QualityReport, compare, evaluate, generated_windows

    old_key = {k: (previous.evaluation or {}).get(k) for k in key} if previous else None
    old_quality = {a.sha256: a.quality for a in previous.artifacts} if previous and old_key == key else {}
    entries = [replace(e, quality=old_quality.get(e.sha256)) for e in entries]
    base, quants = entries[0], entries[1:]
    todo = [q for q in quants if q.quality is None]
    base_needs = base.quality is None and (bool(todo) or request.text is not None)
    against = (base.quant or "base").lower()
    label = f"perplexity, KLD vs {against}" if request.text else f"KLD, top-1 vs {against}"
    if not todo and not base_needs:
        if any(e.quality for e in entries):
            emit(BuildEvent("evaluating", label, 1, 1, reused=True))
        return entries

    def progress(done: int, total: int) -> None:
        emit(BuildEvent("evaluating", label, done, total))

    options: dict[str, Any] = {"text": request.text, "n_ctx": request.n_ctx, "n_chunks": request.n_chunks,
                               "threads": request.threads, "progress": progress}
    if todo:
        # The text the reference writes, once: the KV cache types are scored on it too.
        generated = generated_windows(folder / base.file, request.n_ctx, request.threads) if not request.text else None
        reports = compare([folder / q.file for q in todo], folder / base.file, **options, generated=generated)
    else:
        generated = None
        reports = [evaluate(folder / base.file, None, **options)]
    by_file = {q.file: r for q, r in zip(todo, reports, strict=True)}
    first = reports[0]
    ref_ppl = first.ppl_ref if todo else first.ppl
    base_report = QualityReport(
        ppl=ref_ppl, ppl_ref=ref_ppl, delta_ppl_pct=0.0 if ref_ppl is not None else None,
        kld_mean=None, top1_agreement=None, n_tokens=first.n_tokens, n_chunks=first.n_chunks,
        n_ctx=first.n_ctx, text_sha256=first.text_sha256, text_source=first.text_source,
    )
    emit(BuildEvent("evaluating", label, 1, 1, finished=True))
    out = [replace(base, quality=base.quality if base.quality and not base_needs else base_report.to_dict())]
    out += [replace(q, quality=by_file[q.file].to_dict()) if q.file in by_file else q for q in quants]
    measured = {base.file, *by_file} if base_needs else set(by_file)
    return with_kv_costs(out, measured, folder, options, generated, emit)


def with_kv_costs(entries: list[ManifestArtifact], files: set[str], folder: Path, options: dict[str, Any],
                  generated: Any, emit: Callable[[BuildEvent], None]) -> list[ManifestArtifact]:
    """The GGUF entries among ``files`` with what each quantized KV cache type costs them
    (``quality.kv_cache_types``: KLD and top-1 against an f16 cache, on the evaluation's windows)."""
    from dataclasses import replace

    from edge_runtime.converters.evaluate import kv_type_costs
    from edge_runtime.models.manifest import KV_COSTS_KEY

    out = []
    for entry in entries:
        if entry.file not in files or entry.format != "gguf":
            out.append(entry)
            continue
        label = f"KV cache types of {entry.file}"

        def progress(windows_done: int, total: int, label: str = label) -> None:
            emit(BuildEvent("evaluating", label, windows_done, total))

        costs = kv_type_costs(folder / entry.file, **{**options, "progress": progress}, generated=generated)
        emit(BuildEvent("evaluating", label, 1, 1, finished=True))
        out.append(replace(entry, quality={**(entry.quality or {}), KV_COSTS_KEY: costs}))
    return out


def reference_continuations(
    base_path: Path, base_sha: str, previous: Manifest | None, threads: int | None,
    emit: Callable[[BuildEvent], None],
) -> dict[str, Any]:
    """The greedy continuation of each reference prompt by the unquantized artifact (``models.reference``)."""
    from edge_runtime.backends.llamacpp import greedy_reference

    old = previous.reference if previous else None
    if reference_is_current(old, base_sha):
        emit(BuildEvent("reference", "greedy continuations", 1, 1, reused=True))
        return old
    reference = greedy_reference(base_path, base_sha, threads=threads, progress=lambda done, total:
                                 emit(BuildEvent("reference", "greedy continuations", done, total)))
    emit(BuildEvent("reference", "greedy continuations", 1, 1, finished=True))
    return reference
