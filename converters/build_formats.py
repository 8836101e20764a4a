"""The TFLite and ONNX part of the per-profile build (``build.py`` does GGUF and calls this).

Each format has its own type names (ARCHITECTURE.md, "Names users see"): GGUF ``Q4_0``, ``Q8_0``...; TFLite ``f32``,
``fp16``, ``int8``, ``int4`` (litert-torch recipes ``none``, ``fp16``, ``dynamic_int8``,
``dynamic_int4_block32``); ONNX ``fp32``, ``int8``, ``int4``. ``--quant`` names are sorted by
format: a name only some formats know applies to those (``Q4_0,int8`` builds GGUF Q4_0, TFLite
int8 and ONNX int8). Both converters read a Hugging Face folder; a GGUF source is dequantized to
one once per build, into the output folder's hidden work area (``.edgert-work/``), and kept there
so a later build reuses it. Artifacts are reused when their ``build`` entry (source hash and
settings) matches and the file (or the ONNX folder's files) still hash the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from edge_runtime.converters.build_steps import BuildEvent, TargetProfile
from edge_runtime.errors import InvalidConfigError
from edge_runtime.models.manifest import Manifest, ManifestArtifact

FORMATS = ("gguf", "tflite", "onnx")
BACKEND_FORMATS = {"llama.cpp": "gguf", "tflite": "tflite", "onnx": "onnx"}
ONNX_TYPES = {"fp32": "fp32", "f32": "fp32", "int8": "int8", "int4": "int4"}
WORK_DIR = ".edgert-work"
DEFAULT_KV_LEN = 1024  # TFLite: the exported KV cache (the context); capped by the model's own


@dataclass(frozen=True)
class FormatOptions:
    """Settings of the non-GGUF converters."""

    tflite_kv_len: int | None = None  # None: min(DEFAULT_KV_LEN, max_position_embeddings)
    tflite_prefill: tuple[int, ...] | None = None  # None: the converter's default lengths
    onnx_provider: str = "cpu"


@dataclass
class FormatRungs:
    """Per format, type → the profiles it serves (in build order)."""

    by_format: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse_formats(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(dict.fromkeys(f.strip().lower() for f in text.split(",") if f.strip()))
    bad = [f for f in names if f not in FORMATS]
    if bad or not names:
        raise InvalidConfigError(f"unknown --format {', '.join(bad) or text!r}", f"choose from {', '.join(FORMATS)}")
    return names


def default_formats(profiles: Sequence[TargetProfile]) -> tuple[str, ...]:
    """The formats the profiles' backend orders list and have ladders for; gguf without profiles."""
    if not profiles:
        return ("gguf",)
    wanted: list[str] = []
    for p in profiles:
        for backend in p.backends:
            fmt = BACKEND_FORMATS.get(backend)
            if fmt and p.quant_ladder(fmt) and fmt not in wanted:
                wanted.append(fmt)
    return tuple(f for f in FORMATS if f in wanted) or ("gguf",)


def type_for(fmt: str, name: str) -> str | None:
    """``name`` in ``fmt``'s spelling, or None when that format has no such type."""
    key = name.strip().lower()
    if fmt == "gguf":
        from edge_runtime.converters.quantize import QUANT_TYPES

        return key.upper() if key.upper() in QUANT_TYPES else None
    if fmt == "tflite":
        from edge_runtime.converters.to_tflite import QUANT_RECIPES, recipe_for_type

        try:
            return QUANT_RECIPES[recipe_for_type("f32" if key == "fp32" else key)]
        except InvalidConfigError:
            return None
    return ONNX_TYPES.get(key)


def split_quants(quants: tuple[str, ...], formats: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """``--quant`` names sorted by the formats that know them; a name no chosen format knows is an error."""
    out: dict[str, list[str]] = {f: [] for f in formats}
    for q in quants:
        known = [f for f in formats if type_for(f, q) is not None]
        if not known:
            raise InvalidConfigError(
                f"no format among {', '.join(formats)} has a type {q!r}",
                "GGUF: Q4_0, Q4_K_M, Q8_0...; TFLite: int8, int4, fp16, f32; ONNX: int8, int4, fp32")
        for f in known:
            out[f].append(q)
    return {f: tuple(v) for f, v in out.items()}


def base_type(fmt: str, outtype: str) -> str | None:
    """The unquantized base of ``fmt`` for ``--outtype`` (ONNX on CPU has no 16-bit float: fp32)."""
    if fmt == "tflite":
        return "f32" if outtype == "f32" else "fp16"
    return "fp32"


def plan_other_rungs(formats: tuple[str, ...], profiles: Sequence[TargetProfile],
                     quants: dict[str, tuple[str, ...]] | None, outtype: str, per_profile: int, *,
                     reference_format: str | None = None) -> FormatRungs:
    """TFLite/ONNX types to build. The base is built with ``--outtype f32``, when nothing else is,
    and in ``reference_format``: the build's quality reference when it makes no GGUF."""
    plan = FormatRungs()
    for fmt in (f for f in formats if f != "gguf"):
        chosen: dict[str, list[str]] = {}
        if quants is not None:
            for q in quants.get(fmt, ()):
                t = type_for(fmt, q)
                chosen.setdefault(t, [p.id for p in profiles  # type: ignore[arg-type]
                                      if t in (type_for(fmt, r) for r in p.quant_ladder(fmt))])
        else:
            for p in profiles:
                picked = 0
                for rung in p.quant_ladder(fmt):
                    if picked == per_profile:
                        break
                    t = type_for(fmt, rung)
                    if t is None:
                        plan.warnings.append(f"{p.id}: skipped {fmt} {rung} (not a type this converter writes)")
                        continue
                    chosen.setdefault(t, []).append(p.id)
                    picked += 1
        base = base_type(fmt, outtype)
        if base and (outtype == "f32" or not chosen or fmt == reference_format):
            chosen.setdefault(base, [])
        order = {"f32": 0, "fp32": 0, "fp16": 1, "int8": 2, "int8-wo": 3, "int4": 4}
        plan.by_format[fmt] = {t: chosen[t] for t in sorted(chosen, key=lambda t: order.get(t, 9))}
    return plan


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class OtherFormats:
    """Builds the TFLite and ONNX artifacts of one build into ``folder``."""

    def __init__(self, model: str, folder: Path, src: Path, source: dict[str, Any], previous: Manifest | None,
                 options: FormatOptions, threads: int | None, emit: Callable[[BuildEvent], None]) -> None:
        self.model, self.folder, self.src, self.source = model, folder, src, source
        self.previous, self.options, self.threads, self.emit = previous, options, threads, emit
        self._hf: Path | None = None

    def hf_source(self) -> Path:
        """The source as a Hugging Face folder (a GGUF is dequantized once, kept in the work area)."""
        if self._hf is None:
            if self.src.is_dir():
                self._hf = self.src
            else:
                from edge_runtime.converters.gguf_to_hf import hf_source_from_gguf

                target = self.folder / WORK_DIR / f"hf-{self.source['sha256'][:16]}"
                if not (target / "config.json").is_file():
                    label = "GGUF → HF (dequantized)"
                    self.emit(BuildEvent("converting", label, 0, 1))
                    hf_source_from_gguf(self.src, target)
                    self.emit(BuildEvent("converting", label, 1, 1, finished=True))
                self._hf = target
        return self._hf

    def _reusable(self, file: str, build: dict[str, Any], companions: tuple[Path, ...] = ()) -> ManifestArtifact | None:
        from edge_runtime.files import file_sha256
        from edge_runtime.models.manifest import _size, folder_sha256

        old = self.previous.find(file) if self.previous else None
        path = self.folder / file
        if old is None or old.build != build or not path.exists() or not all(c.is_file() for c in companions):
            return None
        if _size(path) != old.size_bytes:
            return None
        digest = folder_sha256(path) if path.is_dir() else file_sha256(path)
        return old if digest == old.sha256 else None

    def make(self, fmt: str, qtype: str, profiles: tuple[str, ...], role: str) -> tuple[ManifestArtifact, bool]:
        """Build (or reuse) one artifact; returns its entry and whether it was reused."""
        return (self._tflite if fmt == "tflite" else self._onnx)(qtype, profiles, role)

    def _tflite(self, qtype: str, profiles: tuple[str, ...], role: str) -> tuple[ManifestArtifact, bool]:
        from dataclasses import replace

        from edge_runtime.converters.to_tflite import (
            DEFAULT_PREFILL_LENGTHS,
            convert_hf_to_tflite,
            recipe_for_type,
            tflite_file_name,
            tflite_manifest_entry,
        )
        from edge_runtime.formats.tflite import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, sidecar_path

        recipe = recipe_for_type(qtype)
        file = tflite_file_name(self.model, recipe)
        prefill = tuple(self.options.tflite_prefill or DEFAULT_PREFILL_LENGTHS)
        build = {"source_sha256": self.source["sha256"], "format": "tflite", "recipe": recipe,
                 "kv_cache_max_len": self.options.tflite_kv_len, "prefill_lengths": list(prefill),
                 "litert_torch": _version("litert-torch")}
        label = f"TFLite {qtype} ({recipe})"
        path = self.folder / file
        companions = (self.folder / TOKENIZER_FILE, self.folder / TOKENIZER_CONFIG_FILE, sidecar_path(path))
        old = self._reusable(file, build, companions)
        if old is not None:
            self.emit(BuildEvent("converting", label, 1, 1, reused=True))
            return replace(old, profiles=profiles, role=role), True
        src = self.hf_source()
        kv = self.options.tflite_kv_len or _default_kv(src)
        self.emit(BuildEvent("converting", label, 0, 1))
        convert_hf_to_tflite(src, path, quantize=recipe, prefill_lengths=prefill, kv_cache_max_len=kv,
                             threads=self.threads,
                             progress=lambda d, t: self.emit(BuildEvent("converting", label, d, t)))
        self.emit(BuildEvent("converting", label, 1, 1, finished=True))
        entry = tflite_manifest_entry(path, role=role, profiles=profiles, build=build)
        return replace(entry, size_bytes=path.stat().st_size), False

    def _onnx(self, qtype: str, profiles: tuple[str, ...], role: str) -> tuple[ManifestArtifact, bool]:
        from dataclasses import replace

        from edge_runtime.converters.to_onnx import convert_hf_to_onnx, onnx_folder_name
        from edge_runtime.models.artifact import artifact_from_onnx
        from edge_runtime.models.manifest import _size, folder_sha256

        file = onnx_folder_name(self.model, qtype)
        provider = self.options.onnx_provider
        build = {"source_sha256": self.source["sha256"], "format": "onnx", "precision": qtype,
                 "execution_provider": provider, "onnxruntime_genai": _version("onnxruntime-genai")}
        label = f"ONNX {qtype}"
        old = self._reusable(file, build)
        if old is not None:
            self.emit(BuildEvent("converting", label, 1, 1, reused=True))
            return replace(old, profiles=profiles, role=role), True
        path = self.folder / file
        self.emit(BuildEvent("converting", label, 0, 1))
        convert_hf_to_onnx(self.hf_source(), path, precision=qtype, execution_provider=provider,
                           progress=lambda d, t: self.emit(BuildEvent("converting", label, d, t)))
        self.emit(BuildEvent("converting", label, 1, 1, finished=True))
        art = artifact_from_onnx(path)
        entry = ManifestArtifact(
            file=file, format="onnx", quant=art.quant, size_bytes=_size(path), sha256=folder_sha256(path),
            arch=art.arch, n_params=art.n_params, n_ctx_train=art.n_ctx_train, role=role,
            profiles=profiles, build=build,
        )
        return entry, False


def _default_kv(src: Path) -> int:
    from edge_runtime.converters.tflite_config import read_decoder_spec

    return min(DEFAULT_KV_LEN, read_decoder_spec(src).max_position_embeddings)


def scoring_positions(path: Path) -> int | None:
    """The longest window quality can be scored on in this artifact; None when only the request limits it."""
    if path.is_dir():
        from edge_runtime.formats.onnx import read_onnx_folder

        return read_onnx_folder(path).max_length - 1  # genai keeps one position for the next token
    if path.suffix == ".tflite":
        from edge_runtime.formats.tflite import read_tflite_layout

        return read_tflite_layout(path).kv_len
    return None
