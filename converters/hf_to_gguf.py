"""Hugging Face safetensors → GGUF (f32, f16, bf16), tokenizer and chat template included.

``check_source`` reads and checks everything a conversion needs (config, architecture, every
shard's header and every tensor's shape, the tokenizer) without writing a byte, so a bad source
fails before any output exists. ``convert_hf_to_gguf`` then streams: the GGUF header, metadata and
tensor table go first (final shapes and types are known up front), then each tensor is read in
row slabs, converted and appended, so peak memory is about one output tensor, not the model.
The file is written under a temporary name in the destination folder and renamed at the end.

A GGUF file is a source too: ``gguf_source.convert_to_gguf`` dispatches, and ``convert_gguf_to_gguf``
re-types an existing GGUF (dequantizing a quantized one) through llama.cpp's quantizer.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGMLQuantizationType, LlamaFileType

from edge_runtime.converters import safetensors_source as st
from edge_runtime.converters.gguf_arch import GGUFArch, HParams
from edge_runtime.converters.gguf_vocab import TOKENIZER_FILES, VocabSpec, read_json_object, read_vocab, write_vocab
from edge_runtime.converters.registry import converter_for
from edge_runtime.converters.registry import supported_architectures as _supported
from edge_runtime.converters.tensor_names import TensorName
from edge_runtime.errors import InvalidConfigError, InvalidModelFileError, ModelNotFoundError
from edge_runtime.files import atomic_path

Progress = Callable[[int, int], None]

# outtype -> (tensor type of the matrices, general.file_type, numpy dtype holding the data)
OUTTYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType, np.dtype]] = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32, np.dtype(np.float32)),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, np.dtype(np.float16)),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, np.dtype(np.uint16)),
}


@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor to write: from a checkpoint tensor (``ref``) or computed (``data``)."""

    gguf_name: str
    shape: tuple[int, ...]  # row-major, as numpy and HF see it
    entry: TensorName | None = None
    ref: st.TensorRef | None = None
    data: np.ndarray | None = None  # float32, for tensors llama.cpp needs but HF lacks

    def keeps_f32(self, arch: GGUFArch) -> bool:
        return self.entry is None or arch.keeps_f32(self.entry) or len(self.shape) < 2


@dataclass(frozen=True)
class SourceInfo:
    """A checked HF source: what it is and everything needed to convert it."""

    path: Path
    hf_architecture: str
    arch: str  # GGUF architecture name ("llama", "qwen2")
    hparams: HParams
    tensors: tuple[PlannedTensor, ...]
    vocab: VocabSpec
    files: tuple[Path, ...]  # config, tokenizer files and shards: what source_sha256 covers
    name: str
    source_dtype: str  # the checkpoint's weight dtype as safetensors names it ("BF16", "F32")
    converter: GGUFArch = field(compare=False, repr=False)  # the family that checked it
    generation: dict[str, Any] = field(default_factory=dict, compare=False)  # generation_config.json

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors)

    @property
    def largest_tensor_bytes(self) -> int:
        return max((t.ref.nbytes for t in self.tensors if t.ref is not None), default=0)


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion wrote, for the manifest."""

    path: Path
    arch: str
    hf_architecture: str | None  # None when the source was a GGUF file
    n_params: int
    n_tensors: int
    outtype: str
    source_sha256: str
    chat_template: str | None
    source_quantized: bool  # the source was itself quantized (a GGUF such as Q4_1)
    source_type: str  # the source's own weight type: "BF16", "F32", "Q4_1", ...
    size_bytes: int
    seconds: float
    context_length: int | None
    tokenizer_pre: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def supported_architectures() -> list[str]:
    """HF ``architectures`` names this converter turns into GGUF."""
    return _supported("gguf")


def check_source(src: str | os.PathLike[str]) -> SourceInfo:
    """Validate a HF model folder without writing anything; raise a clear error if it is bad."""
    folder = Path(src)
    if not folder.is_dir():
        raise ModelNotFoundError(f"{folder}: not a model folder",
                                 "point at a Hugging Face model folder (config.json, *.safetensors, tokenizer);"
                                 " a .gguf file converts through gguf_source.convert_to_gguf")
    config = _load_config(folder)
    archs = config.get("architectures") or []
    hf_arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    arch_cls = converter_for("gguf", hf_arch or "(none in config.json)")
    hp = HParams.from_config(config, str(folder / "config.json"))
    arch: GGUFArch = arch_cls(hp)
    shards = st.find_shards(folder)
    refs = _all_refs(folder, shards)
    chosen = arch.expected_tensors(set(refs))
    planned = []
    for hf_name, (entry, bid) in chosen.items():
        ref, want = refs[hf_name], arch.expected_shape(entry)
        if ref.shape != want:
            raise InvalidModelFileError(
                f"{ref.shard.name}: tensor {hf_name} has shape {list(ref.shape)}, "
                f"but config.json implies {list(want)}",
                "the weights do not belong to this config.json",
            )
        planned.append((_order_key(entry, bid, arch), PlannedTensor(entry.gguf_name(bid), ref.shape, entry, ref)))
    tensors = [p for _, p in sorted(planned, key=lambda kp: kp[0])]
    tensors += [PlannedTensor(name, data.shape, data=data) for name, data in arch.extra_tensors()]
    vocab = read_vocab(folder, hp.vocab)
    extra = [folder / n for n in ("config.json", *TOKENIZER_FILES) if (folder / n).is_file()]
    index = folder / st.INDEX_NAME
    dtypes = sorted({t.ref.dtype for t in tensors if t.ref is not None})
    return SourceInfo(
        path=folder, hf_architecture=hf_arch, arch=arch.arch_name, hparams=hp, tensors=tuple(tensors),
        vocab=vocab, files=tuple(extra + ([index] if index.is_file() else []) + shards),
        name=str(config.get("_name_or_path") or folder.name).rstrip("/").split("/")[-1] or folder.name,
        source_dtype="+".join(dtypes), generation=read_json_object(folder / "generation_config.json") or {},
        converter=arch,
    )


def convert_hf_to_gguf(src: str | os.PathLike[str], out: str | os.PathLike[str], *, outtype: str = "f16",
                       progress: Progress | None = None) -> ConversionResult:
    """Convert a HF folder to one GGUF file of ``outtype`` (f32, f16, bf16), atomically.

    ``progress(done_bytes, total_bytes)`` is called after each tensor; an exception it raises (or
    Ctrl-C) aborts the conversion and removes the partial file.
    """
    if outtype not in OUTTYPES:
        raise InvalidConfigError(f"unknown outtype {outtype!r}", f"choose one of {', '.join(OUTTYPES)}")
    started = time.perf_counter()
    info = check_source(src)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    source_sha = st.hash_files(info.files, info.path)
    with atomic_path(target) as tmp:
        writer = GGUFWriter(tmp, info.arch)
        try:
            _write(writer, info, info.converter, outtype, progress)
        finally:
            writer.close()
    return ConversionResult(
        path=target, arch=info.arch, hf_architecture=info.hf_architecture, n_params=info.n_params,
        n_tensors=len(info.tensors), outtype=outtype, source_sha256=source_sha,
        chat_template=info.vocab.chat_template, source_quantized=False, source_type=info.source_dtype,
        size_bytes=target.stat().st_size, seconds=time.perf_counter() - started,
        context_length=info.hparams.n_ctx, tokenizer_pre=info.vocab.pre,
    )


def _write(w: GGUFWriter, info: SourceInfo, arch: GGUFArch, outtype: str, progress: Progress | None) -> None:
    qtype, ftype, np_dtype = OUTTYPES[outtype]
    w.add_type("model")
    w.add_name(info.name)
    w.add_file_type(int(ftype))
    arch.write_hparams(w)
    write_vocab(w, info.vocab)
    _write_generation_defaults(w, info.generation)
    sizes = []
    for t in info.tensors:
        f32 = t.keeps_f32(arch)
        dtype, raw = (np.dtype(np.float32), GGMLQuantizationType.F32) if f32 else (np_dtype, qtype)
        nbytes = int(np.prod(t.shape)) * dtype.itemsize
        w.add_tensor_info(t.gguf_name, t.shape, dtype, nbytes, raw_dtype=raw)
        sizes.append(nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    total, done = sum(sizes), 0
    for t, nbytes in zip(info.tensors, sizes, strict=True):
        data = _tensor_data(t, arch, np.dtype(np.float32) if t.keeps_f32(arch) else np_dtype)
        w.write_tensor_data(data)
        del data
        done += nbytes
        if progress is not None:
            progress(done, total)


def _tensor_data(t: PlannedTensor, arch: GGUFArch, dtype: np.dtype) -> np.ndarray:
    if t.data is not None:
        return _cast(t.data.astype(np.float32), dtype)
    assert t.ref is not None and t.entry is not None
    out = np.empty(t.shape, dtype=dtype)
    order = arch.row_order(t.entry)
    for first, count in st.row_slabs(t.ref):
        rows = _cast(arch.transform(t.entry, st.read_rows(t.ref, first, count)), dtype)
        if order is None:
            out[first:first + count] = rows
        else:
            out[order[first:first + count]] = rows
    return out


def _cast(rows: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 rows to the output type; bf16 as its bits, rounded to nearest even."""
    if dtype == np.uint16:
        bits = rows.astype(np.float32, copy=False).view(np.uint32)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(rows)
        if nan.any():  # rounding could carry a NaN's payload into infinity; keep it a NaN
            out[nan] = (bits[nan] >> 16).astype(np.uint16) | 0x0040
        return out
    return rows.astype(dtype, copy=False)


def _order_key(entry: TensorName, bid: int | None, arch: GGUFArch) -> tuple[int, int, int]:
    from gguf.constants import MODEL_TENSOR

    index = arch.table.index(entry)
    if bid is not None:
        return (1, bid, index)
    return (0 if entry.kind is MODEL_TENSOR.TOKEN_EMBD else 2, 0, index)


def _load_config(folder: Path) -> dict[str, Any]:
    config = read_json_object(folder / "config.json")
    if config is None:
        raise ModelNotFoundError(f"{folder}: no config.json", "is this a Hugging Face model folder?")
    return config


def _all_refs(folder: Path, shards: list[Path]) -> dict[str, st.TensorRef]:
    refs: dict[str, st.TensorRef] = {}
    for shard in shards:
        for ref in st.read_header(shard):
            if ref.name in refs:
                raise InvalidModelFileError(f"{folder}: tensor {ref.name} appears in two shards")
            refs[ref.name] = ref
    index = folder / st.INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        lost = sorted(n for n, shard in weight_map.items() if refs.get(n) is None or refs[n].shard.name != shard)
        if lost:
            raise InvalidModelFileError(f"{index}: {len(lost)} tensor(s) are not in the shard it names, "
                                        f"e.g. {lost[0]}", "the download is incomplete or mixed")
    return refs


def _write_generation_defaults(w: GGUFWriter, gen: dict[str, Any]) -> None:
    """The model's recommended sampling (generation_config.json) as general.sampling.* keys."""
    if not gen.get("do_sample"):
        return
    for key, add in (("temperature", w.add_sampling_temp), ("top_p", w.add_sampling_top_p),
                     ("min_p", w.add_sampling_min_p)):
        if isinstance(gen.get(key), (int, float)) and not isinstance(gen.get(key), bool):
            add(float(gen[key]))
    if isinstance(gen.get("top_k"), int) and not isinstance(gen.get("top_k"), bool):
        w.add_sampling_top_k(gen["top_k"])
