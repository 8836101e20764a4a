"""The per-profile pipeline: convert once, quantize each rung the profiles ask for, evaluate, write
the manifest, add to the store.

Rungs: each named profile contributes the first ``RUNGS_PER_PROFILE`` (2) buildable types of its
GGUF quant ladder: its preferred type and the next one down, so the planner has a choice on that
device class without building the whole ladder (``--quant`` replaces this; the artifact then
serves every named profile whose ladder lists it).

Every file appears atomically (the converter and quantizer write temporary names and rename), and
the manifest is rewritten after each step, so an interrupted run loses at most the step in
progress and the next run finishes the job. What an artifact was built from (source sha256,
base sha256, type, tool versions) is recorded in its ``build`` entry; an artifact whose entry and
file still match is reused, not rebuilt. Quality figures are reused the same way, keyed by the
evaluation settings and the files' hashes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edge_runtime.converters.build_formats import (
    FormatOptions,
    OtherFormats,
    plan_other_rungs,
    scoring_positions,
    split_quants,
)
from edge_runtime.converters.build_steps import (
    BuildEvent,
    OutputFolder,
    TargetProfile,
    artifact_entry,
    evaluate_artifacts,
    reference_continuations,
    source_identity,
    tool_versions,
)
from edge_runtime.errors import InvalidConfigError, ModelNotFoundError
from edge_runtime.models.artifact import FLOAT_TYPES
from edge_runtime.models.manifest import Manifest, ManifestArtifact

RUNGS_PER_PROFILE = 2

OnEvent = Callable[[BuildEvent], None]


@dataclass(frozen=True)
class BuildRequest:
    """What ``edgert convert`` asks for."""

    source: str  # HF folder, .gguf file, or a model name (store or embedded)
    out: str | None = None  # default ./out/<model>/
    profiles: tuple[TargetProfile, ...] = ()
    quants: tuple[str, ...] | None = None  # overrides the profiles' rungs
    outtype: str = "f16"
    evaluate: bool = True
    text: str | None = None  # perplexity text; None: KLD/top-1 on generated text
    n_ctx: int = 512
    n_chunks: int | None = 16
    threads: int | None = None
    add_to_store: bool = True
    formats: tuple[str, ...] | None = None  # None: gguf (the CLI defaults to the profiles' formats)
    format_options: FormatOptions = FormatOptions()


@dataclass(frozen=True)
class Rung:
    """One type to build and the profiles it serves."""

    qtype: str
    profiles: tuple[str, ...]


@dataclass(frozen=True)
class BuildResult:
    """What a build produced."""

    folder: Path
    manifest: Manifest
    reused: tuple[str, ...]  # files not rebuilt
    built: tuple[str, ...]  # files made by this run
    warnings: tuple[str, ...] = ()
    stored_as: str | None = None

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"


def plan_rungs(profiles: Sequence[TargetProfile], quants: tuple[str, ...] | None,
               outtype: str) -> tuple[list[Rung], list[str]]:
    """The quantized types to build (base excluded) and warnings about rungs skipped."""
    from edge_runtime.converters.quantize import NEEDS_IMATRIX, normalize_qtype

    warnings: list[str] = []
    chosen: dict[str, list[str]] = {}
    if quants is not None:
        for q in quants:
            name = normalize_qtype(q)
            chosen[name] = [p.id for p in profiles if name in (r.upper() for r in p.quant_ladder("gguf"))]
    else:
        for p in profiles:
            picked = 0
            for rung in p.quant_ladder("gguf"):
                if picked == RUNGS_PER_PROFILE:
                    break
                if rung.upper() in NEEDS_IMATRIX:
                    warnings.append(f"{p.id}: skipped {rung} (needs an importance matrix)")
                    continue
                chosen.setdefault(normalize_qtype(rung), []).append(p.id)
                picked += 1
    base = outtype.upper()
    rungs = [Rung(q, tuple(ps)) for q, ps in chosen.items()]
    return sorted(rungs, key=lambda r: (r.qtype != base, _bits(r.qtype))), warnings


# Bits per weight of llama.cpp's types (7B figures from its quantize tool), to order the
# artifacts from largest to smallest; unknown types fall back to the number in their name.
_BPW = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_1": 6.0, "Q5_K_M": 5.69,
        "Q5_K_S": 5.54, "Q5_0": 5.5, "Q4_1": 5.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5,
        "IQ4_NL": 4.5, "IQ4_XS": 4.25, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "IQ3_M": 3.66, "Q3_K_S": 3.5,
        "IQ3_S": 3.44, "Q2_K": 2.96}


def _bits(qtype: str) -> float:
    """Minus the bits per weight: sorting by it puts the largest type first."""
    m = re.search(r"(\d+)", qtype)
    return -_BPW.get(qtype, float(m.group(1)) if m else 0.0)


def resolve_source(spec: str) -> tuple[Path, str]:
    """The source as a path (HF folder or GGUF file) and the model's name for file names."""
    from edge_runtime.models.manifest import has_manifest
    from edge_runtime.models.spec import find_artifacts
    from edge_runtime.models.store import model_slug

    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            from edge_runtime.converters.hf_to_gguf import check_source

            return path, model_slug(check_source(path).name)
        if has_manifest(path):
            return _base_of(find_artifacts(str(path)))
        raise ModelNotFoundError(f"{spec}: not a Hugging Face model folder (no config.json)",
                                 "point at a folder with config.json, *.safetensors and a tokenizer")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InvalidConfigError(f"{spec}: not a .gguf file or a model folder")
        return path, model_slug(_strip_quant(path.stem))
    return _base_of(find_artifacts(spec))


def _base_of(artifacts: list[Any]) -> tuple[Path, str]:
    """From a store entry or embedded model, the float artifact if there is one."""
    from edge_runtime.models.store import model_slug

    best = next((a for a in artifacts if (a.quant or "").upper() in FLOAT_TYPES), artifacts[0])
    path = Path(best.path)
    return path, model_slug(_strip_quant(path.stem))


def _strip_quant(stem: str) -> str:
    return re.sub(r"[.\-_](f32|f16|bf16|i?q\d\w*)$", "", stem, flags=re.IGNORECASE)


def build(request: BuildRequest, *, on_event: OnEvent | None = None) -> BuildResult:
    """Run the pipeline for ``request``; see the module docstring."""
    from edge_runtime.converters.evaluate import read_text
    from edge_runtime.converters.hf_to_gguf import OUTTYPES

    emit = on_event or (lambda e: None)
    if request.outtype not in OUTTYPES:
        raise InvalidConfigError(f"unknown --outtype {request.outtype!r}", f"choose one of {', '.join(OUTTYPES)}")
    formats = request.formats or ("gguf",)
    by_format = split_quants(request.quants, formats) if request.quants is not None else None
    rungs, warnings = ([], [])
    if "gguf" in formats:
        rungs, warnings = plan_rungs(request.profiles, by_format["gguf"] if by_format else None, request.outtype)
    # Quality needs a reference: the GGUF base, else the first other format's base.
    reference_format = next((f for f in formats if f != "gguf"), None) if "gguf" not in formats else None
    others = plan_other_rungs(formats, request.profiles, by_format, request.outtype, RUNGS_PER_PROFILE,
                              reference_format=reference_format if request.evaluate else None)
    warnings += others.warnings
    text_sha = read_text(request.text)[1] if request.evaluate and request.text else None
    src, model = resolve_source(request.source)
    folder = Path(request.out) if request.out else default_out(model)
    with OutputFolder(folder) as out:
        previous, why = out.previous_manifest()
        if why:
            warnings.append(why)
        emit(BuildEvent("hashing", "source", 0, 1))
        source = source_identity(src)
        emit(BuildEvent("hashing", "source", 1, 1, finished=True))
        tools = tool_versions(source["kind"])
        state = _State(model, source, tools, previous, folder)
        base = None
        if "gguf" in formats:
            base_type = request.outtype.upper()
            base_profiles = tuple(p for r in rungs if r.qtype == base_type for p in r.profiles)
            base = state.make_base(src, request.outtype, base_profiles, emit)
            for rung in (r for r in rungs if r.qtype != base_type):
                state.make_quant(base, rung, request.threads, emit)
        builder = OtherFormats(model, folder, src, source, previous, request.format_options, request.threads, emit)
        for fmt, types in others.by_format.items():
            for qtype, profiles in types.items():
                role = "base" if qtype in ("f32", "fp32", "fp16") else "quantized"
                entry, reused = builder.make(fmt, qtype, tuple(profiles), role)
                state._add(entry, reused)
        reference = base or next((e for e in state.entries if e.role == "base"), None)
        if reference is not None and request.evaluate:
            state.entries, state.evaluation = _evaluate(state.entries, reference, previous, text_sha, request, folder,
                                                        warnings, emit)
        if base is not None:
            state.reference = reference_continuations(folder / base.file, base.sha256, previous, request.threads, emit)
        manifest = state.save(complete=True)
    stored = None
    if request.add_to_store:
        from edge_runtime.models.store import add_model

        try:
            stored = add_model(folder, name=model, verify=False).model  # every file was just hashed
        except InvalidConfigError as exc:  # a name the store cannot take: the build itself stands
            warnings.append(f"not added to the model store: {exc.message}; add it with "
                            f"`edgert models add {folder} --name NAME`")
    wanted = {e.file for e in state.entries}
    stray = sorted(p.name for pattern in ("*.gguf", "*.tflite", "*-onnx") for p in folder.glob(pattern)
                   if p.name not in wanted)
    if stray:
        warnings.append(f"left in {folder} but not part of this build: {', '.join(stray)}")
    return BuildResult(folder, manifest, tuple(state.reused), tuple(state.built), tuple(warnings), stored)


def _evaluate(entries: list[ManifestArtifact], reference: ManifestArtifact, previous: Manifest | None,
              text_sha: str | None, request: BuildRequest, folder: Path, warnings: list[str],
              emit: OnEvent) -> tuple[list[ManifestArtifact], dict[str, Any]]:
    """Every artifact's quality against ``reference``, on windows every format of the build can hold."""
    n_ctx = request.n_ctx
    for e in entries:
        fits = scoring_positions(folder / e.file)
        if fits is not None and fits < n_ctx:
            warnings.append(f"quality measured on {fits}-token windows, not {n_ctx}: {e.file} holds {fits} positions")
            n_ctx = fits
    if n_ctx != request.n_ctx:
        from dataclasses import replace

        request = replace(request, n_ctx=n_ctx)
    key = {"text_sha256": text_sha, "n_ctx": n_ctx, "n_chunks": request.n_chunks, "base_sha256": reference.sha256}
    evaluated = evaluate_artifacts([reference] + [e for e in entries if e is not reference], previous, key, request,
                                   folder, emit)
    by_file = {e.file: e for e in evaluated}
    return [by_file[e.file] for e in entries], {
        "text": str(request.text) if request.text else None, **key,
        "method": f"llama-perplexity windows (second half scored); KLD and top-1 vs {reference.file}"}


class _State:
    """The manifest as it grows during one build; saved after every step."""

    def __init__(self, model: str, source: dict[str, Any], tools: dict[str, Any],
                 previous: Manifest | None, folder: Path) -> None:
        self.model, self.source, self.tools, self.previous, self.folder = model, source, tools, previous, folder
        self.entries: list[ManifestArtifact] = []
        self.evaluation: dict[str, Any] | None = None
        self.reference: dict[str, Any] | None = None
        self.reused: list[str] = []
        self.built: list[str] = []

    def save(self, *, complete: bool = False) -> Manifest:
        from edge_runtime.models.manifest import write_manifest

        manifest = Manifest(
            model=self.model, source=self.source, tools=self.tools, artifacts=tuple(self.entries),
            evaluation=self.evaluation, reference=self.reference, complete=complete,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), folder=self.folder,
        )
        write_manifest(self.folder, manifest)
        return manifest

    def _reusable(self, file: str, build: dict[str, Any]) -> ManifestArtifact | None:
        """The previous entry for ``file`` when it was built the same way and still matches."""
        from edge_runtime.files import file_sha256

        old = self.previous.find(file) if self.previous else None
        path = self.folder / file
        if old is None or old.build != build or not path.is_file() or path.stat().st_size != old.size_bytes:
            return None
        return old if file_sha256(path) == old.sha256 else None

    def _add(self, entry: ManifestArtifact, reused: bool) -> ManifestArtifact:
        self.entries.append(entry)
        (self.reused if reused else self.built).append(entry.file)
        self.save()
        return entry

    def make_base(self, src: Path, outtype: str, profiles: tuple[str, ...], emit: OnEvent) -> ManifestArtifact:
        from edge_runtime.converters.gguf_source import convert_to_gguf

        file = f"{self.model}-{outtype}.gguf"
        build = {"source_sha256": self.source["sha256"], "outtype": outtype,
                 "converter": self.tools["converter"], "llama_cpp": self.tools["llama_cpp_python"]}
        label = f"{'HF' if self.source['kind'] == 'hf' else 'GGUF'} → GGUF {outtype}"
        old = self._reusable(file, build)
        if old is not None:
            emit(BuildEvent("converting", label, 1, 1, reused=True))
            return self._add(_with(old, profiles=profiles), True)
        emit(BuildEvent("converting", label, 0, 1))
        result = convert_to_gguf(src, self.folder / file, outtype=outtype,
                                 progress=lambda d, t: emit(BuildEvent("converting", label, d, t)))
        if result.source_sha256 != self.source["sha256"]:  # the source changed while we read it
            raise InvalidConfigError(f"{src}: changed during the conversion", "run the conversion again")
        entry = artifact_entry(self.folder / file, "base", profiles, build)
        emit(BuildEvent("converting", label, 1, 1, finished=True))
        return self._add(entry, False)

    def make_quant(self, base: ManifestArtifact, rung: Rung, threads: int | None, emit: OnEvent) -> None:
        from edge_runtime.converters.quantize import quantize_gguf

        file = f"{self.model}-{rung.qtype}.gguf"
        build = {"source_sha256": self.source["sha256"], "base_sha256": base.sha256, "quant": rung.qtype,
                 "llama_cpp": self.tools["llama_cpp_python"]}
        old = self._reusable(file, build)
        if old is not None:
            emit(BuildEvent("quantizing", rung.qtype, 1, 1, reused=True))
            self._add(_with(old, profiles=rung.profiles), True)
            return
        emit(BuildEvent("quantizing", rung.qtype, 0, 1))
        result = quantize_gguf(self.folder / base.file, self.folder / file, rung.qtype, threads=threads,
                               progress=lambda d, t: emit(BuildEvent("quantizing", rung.qtype, d, t)))
        emit(BuildEvent("quantizing", rung.qtype, 1, 1, finished=True))
        entry = artifact_entry(self.folder / file, "quantized", rung.profiles, build)
        self._add(_with(entry, fallbacks=tuple(result.fallbacks)), False)


def _with(entry: ManifestArtifact, **changes: Any) -> ManifestArtifact:
    from dataclasses import replace

    return replace(entry, **changes)


def default_out(model: str) -> Path:
    """``./out/<model>/``, where ``edgert convert`` writes without ``--out``."""
    return Path(os.curdir) / "out" / model
