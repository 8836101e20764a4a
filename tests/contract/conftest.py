"""The same tiny model, converted by the project's own converters, loaded by each backend in turn.

The tiny random Llama of ``tiny_models.py`` becomes a float32 GGUF (llama.cpp), an fp32 ONNX
folder (ONNX Runtime GenAI) and a float32 .tflite (LiteRT). Every test that takes ``model`` or
``converted`` runs once per backend, with the ids ``llama.cpp``, ``onnx`` and ``tflite``; pytest
keeps one backend's model loaded at a time. Conversions are cached under the pytest cache: the
TFLite one is ``test_tflite.py``'s (one file, converted once for both suites), the ONNX one is
keyed by the converter's sources and onnxruntime-genai's version; the GGUF one takes a tenth of a
second and is made afresh each run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path

import pytest

from edge_runtime.backends import load_backend
from edge_runtime.backends.base import Model, Settings

from .streams import N_CTX

REPO = Path(__file__).resolve().parents[2]
BACKENDS = ("llama.cpp", "onnx", "tflite")
SETTINGS = Settings(n_ctx=N_CTX, n_threads=2)


@dataclass(frozen=True)
class Converted:
    """An artifact of the tiny model and the backend that runs it."""

    backend: str
    path: Path

    def load(self, **settings: object) -> Model:
        """A new model on this artifact (``SETTINGS``, with ``settings`` replaced)."""
        return load_backend(self.backend).load(str(self.path), replace(SETTINGS, **settings))


@pytest.fixture(scope="session", params=BACKENDS)
def converted(request: pytest.FixtureRequest, tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Converted:
    """The tiny Llama as the artifact ``request.param`` runs, really converted."""
    backend = request.param
    if backend == "llama.cpp":
        from edge_runtime.converters.hf_to_gguf import convert_hf_to_gguf

        out = tmp_path_factory.mktemp("contract-gguf") / "tiny-f32.gguf"
        return Converted(backend, convert_hf_to_gguf(tiny_llama_dir, out, outtype="f32").path)
    if backend == "onnx":
        return Converted(backend, _onnx_fp32(request, tiny_llama_dir))
    # Skips, with test_tflite's reason, where litert-torch or ai-edge-litert is missing.
    from test_tflite import KV_LEN, _converted

    assert KV_LEN == N_CTX, "the contract's context is the TFLite export's"
    return Converted(backend, _converted(request, tiny_llama_dir, "none"))


@pytest.fixture(scope="session")
def model(converted: Converted) -> Iterator[Model]:
    """One loaded model per backend, shared by the tests as a server's requests share it."""
    with converted.load() as loaded:
        yield loaded


def _onnx_fp32(request: pytest.FixtureRequest, src: Path) -> Path:
    """``src`` as an fp32 ONNX folder, converted once and kept under the pytest cache."""
    from tiny_models import _cached

    from edge_runtime.converters.to_onnx import convert_hf_to_onnx, onnx_folder_name

    pytest.importorskip("onnxruntime_genai", reason='needs the onnx extra: pip install "edge-runtime[onnx]"')

    def build(folder: Path) -> None:
        # Only a conversion needs these (in the builder's own process): a cached folder does not.
        missing = [m for m in ("onnx", "onnx_ir", "onnxscript", "torch", "transformers") if not find_spec(m)]
        if missing:
            pytest.skip(f"converting needs {', '.join(missing)}: pip install \"edge-runtime[convert]\"")
        convert_hf_to_onnx(src, folder / name, precision="fp32")

    # A converter or builder change makes a new key: a stale artifact never stands in for a new one.
    digest = hashlib.sha256(version("onnxruntime-genai").encode())
    for source in ("to_onnx.py", "onnx_builder.py"):
        digest.update((REPO / "converters" / source).read_bytes())
    name = onnx_folder_name("tiny", "fp32")
    return _cached(request, f"contract-onnx-{digest.hexdigest()[:12]}", build) / name
