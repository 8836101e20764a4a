"""The raw LiteRT layer of the TFLite backend: find a runtime, run one signature step.

Two engines behind one call, ``run(signature, tokens, pos, width, rows)``:

- ``CompiledEngine`` (ai-edge-litert's ``CompiledModel``, XNNPACK on the CPU): the KV cache lives
  in two sets of LiteRT tensor buffers; each step reads one set and writes the other, then they
  swap. No cache byte crosses into Python, and every signature shares the same buffers.
- ``InterpreterEngine`` (the classic ``Interpreter`` of ai-edge-litert, or of ``tflite-runtime``
  on images that only have that): signature runners with the cache as numpy arrays passed in and
  taken back each step (two cache copies per step, and each signature's own arena).

``find_runtime`` prefers ai-edge-litert; tflite-runtime is used only when it is all there is,
and then the model's ``min_runtime_version`` is checked first: tflite-runtime 2.14 refuses
litert-torch's composite ops and returns all-zero logits for dynamic_int8 files without an error.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import BackendUnavailableError, GenerationError, ModelLoadError
from edge_runtime.formats.tflite import (
    DECODE,
    INPUT_POS,
    LOGITS,
    TOKENS,
    TfliteLayout,
    runtime_too_old,
)
from edge_runtime.quiet import quiet_native_stderr

INSTALL_HINT = 'pip install "edge-runtime[tflite]"'


@dataclass(frozen=True)
class Runtime:
    """The TFLite runtime found here."""

    package: str  # "ai-edge-litert" or "tflite-runtime"
    version: str
    compiled_model: bool  # LiteRT's CompiledModel API is there (shared KV buffers)


def find_runtime() -> Runtime:
    """ai-edge-litert if installed, else tflite-runtime; ImportError when neither is."""
    try:
        importlib.import_module("ai_edge_litert.interpreter")
    except ImportError:
        pass
    else:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("ai-edge-litert")
        except PackageNotFoundError:  # a source build without package metadata
            found = "unknown"
        # The CompiledModel API with CPU options came with ai-edge-litert 2.x; older wheels run
        # through the classic Interpreter.
        has_compiled = all(importlib.util.find_spec(f"ai_edge_litert.{m}") is not None
                           for m in ("compiled_model", "cpu_options", "options"))
        return Runtime("ai-edge-litert", found, has_compiled)
    try:
        tflite_runtime = importlib.import_module("tflite_runtime")
        importlib.import_module("tflite_runtime.interpreter")
    except ImportError:
        raise ImportError("neither ai-edge-litert nor tflite-runtime is installed") from None
    return Runtime("tflite-runtime", str(getattr(tflite_runtime, "__version__", "0")), False)


_exit_hook_installed = False


def _quiet_native_teardown() -> None:
    """From Python's exit on, send stderr to /dev/null: LiteRT's process-wide environment logs
    each accelerator it destroys from C++ static destructors, after everything we print."""
    global _exit_hook_installed
    if _exit_hook_installed or os.environ.get("EDGERT_DEBUG"):
        return
    import atexit
    import sys

    def silence() -> None:
        try:
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        except (OSError, ValueError):
            pass

    atexit.register(silence)
    _exit_hook_installed = True


def _native_error(lines: list[str]) -> str | None:
    errors = [ln.strip() for ln in lines if "ERROR" in ln or ln.strip().startswith("└")]
    return " ".join(errors)[:300] or None


def weight_cache_path(model: Path, runtime_version: str = "") -> Path | None:
    """Where XNNPACK keeps this model's packed weights, or None where nothing can be written.

    XNNPACK repacks every weight matrix for this CPU when it loads a model, separately for each
    signature: without a cache a 135M model's four signatures hold four packed copies (~700 MiB).
    With one, the packed weights are written once, then memory-mapped and shared by every
    signature and every later load (which also starts in a tenth of the time).
    """
    from edge_runtime.models.locations import home

    try:
        stat = model.stat()
        folder = home() / "cache" / "xnnpack"
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    where = hashlib.sha256(str(model.resolve()).encode()).hexdigest()[:12]
    # The packed layout depends on the file, the CPU and the XNNPACK inside the runtime.
    what = f"{stat.st_size}|{stat.st_mtime_ns}|{platform.machine()}|{runtime_version}"
    what = hashlib.sha256(what.encode()).hexdigest()[:8]
    return folder / f"{model.stem}-{where}-{what}.xnnpack"


def _drop_stale_caches(cache: Path) -> None:
    # Caches of earlier versions of the same file (same path, other size or time) are dead weight.
    stem, where, _ = cache.stem.rsplit("-", 2)
    for old in cache.parent.glob(f"{stem}-{where}-*.xnnpack"):
        if old != cache:
            old.unlink(missing_ok=True)


def check_runtime_supports(runtime: Runtime, layout: TfliteLayout) -> None:
    """Refuse a model the runtime would reject or, worse, run wrongly (old tflite-runtime).

    ``min_runtime_version`` counts in TensorFlow releases, which tflite-runtime's versions
    follow; ai-edge-litert numbers itself anew (1.x, 2.x) and every release of it postdates the
    TensorFlow 2.17 that litert-torch's files ask for, so only tflite-runtime is compared.
    """
    if runtime.package != "tflite-runtime":
        return
    if runtime_too_old(runtime.version, layout.min_runtime_version):
        raise BackendUnavailableError(
            f"{layout.path.name} needs TFLite runtime {layout.min_runtime_version} or newer; "
            f"{runtime.package} {runtime.version} would refuse it or compute wrong logits",
            INSTALL_HINT,
        )


def open_engine(runtime: Runtime, layout: TfliteLayout, n_threads: int) -> CompiledEngine | InterpreterEngine:
    """The fastest engine this runtime offers, loaded with ``n_threads`` CPU threads."""
    check_runtime_supports(runtime, layout)
    try:
        if runtime.compiled_model:
            try:
                return CompiledEngine(layout, n_threads, runtime.version)
            except (AttributeError, TypeError, ImportError):
                pass  # an ai-edge-litert whose CompiledModel API differs: the Interpreter still works
        return InterpreterEngine(layout, n_threads, runtime.package)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{runtime.package} could not load {layout.path.name}: {first}") from None


def _tokens_and_positions(tokens: Sequence[int], pos: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    # Rows past the real tokens are padding: their keys and values land in cache positions after
    # the prompt, which the causal mask hides and the next real token overwrites.
    ids = np.zeros((1, width), dtype=np.int32)
    ids[0, : len(tokens)] = tokens
    return ids, np.arange(pos, pos + width, dtype=np.int32)


class CompiledEngine:
    """LiteRT ``CompiledModel`` with the KV cache double-buffered in LiteRT tensor buffers."""

    kind = "compiled"

    def __init__(self, layout: TfliteLayout, n_threads: int, runtime_version: str = "") -> None:
        self.layout = layout
        self.weight_cache = weight_cache_path(layout.path, runtime_version)
        self._model = self._compile_cached(n_threads)
        decode = layout.signatures[DECODE]
        self._kv_names = [n for n in decode.inputs if n.startswith("kv_cache_")]
        self._io: dict[str, tuple[Any, Any, Any]] = {}
        _quiet_native_teardown()
        with quiet_native_stderr():  # the first buffer brings up (and logs) a LiteRT environment
            self._current = self._kv_set()
            self._spare = self._kv_set()

    def _compile_cached(self, n_threads: int) -> Any:
        cache = self.weight_cache
        if cache is None:
            return self._compile(n_threads, None)
        if cache.is_file():
            try:
                return self._compile(n_threads, cache)
            except RuntimeError:
                cache.unlink(missing_ok=True)  # unreadable (damaged, or foreign): build it anew
        # Built under a private name and renamed once complete, so a concurrent load never maps
        # a half-written cache; the mapping stays valid across the rename.
        building = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        try:
            model = self._compile(n_threads, building)
            os.replace(building, cache)
            _drop_stale_caches(cache)
            return model
        except (RuntimeError, OSError):
            self.weight_cache = None  # a cache that cannot be written (disk full): load without
            return self._compile(n_threads, None)
        finally:
            building.unlink(missing_ok=True)

    def _compile(self, n_threads: int, cache: Path | None) -> Any:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.cpu_options import CpuOptions
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
        from ai_edge_litert.options import Options

        cpu = CpuOptions(num_threads=n_threads, xnnpack_weight_cache_path=str(cache) if cache else "")
        options = Options(hardware_accelerators=HardwareAccelerator.CPU, cpu_options=cpu)
        with quiet_native_stderr() as log:
            try:
                return CompiledModel.from_file(str(self.layout.path), options=options)
            except (RuntimeError, ValueError) as exc:
                raise RuntimeError(_native_error(log) or str(exc)) from None

    def _kv_set(self) -> dict[str, Any]:
        buffers = {}
        for name in self._kv_names:
            buf = self._model.create_input_buffer_by_name(DECODE, name)
            # Fresh buffers hold whatever the allocator left: masked positions still enter the
            # attention product, and a NaN there poisons every score, so start from zeros.
            info = self.layout.signatures[DECODE].inputs[name]
            buf.write(np.zeros(info.shape, dtype=np.float16 if info.dtype == "float16" else np.float32))
            buffers[name] = buf
        return buffers

    def _buffers(self, signature: str) -> tuple[Any, Any, Any]:
        if signature not in self._io:
            m = self._model
            self._io[signature] = (m.create_input_buffer_by_name(signature, TOKENS),
                                   m.create_input_buffer_by_name(signature, INPUT_POS),
                                   m.create_output_buffer_by_name(signature, LOGITS))
        return self._io[signature]

    def run(self, signature: str, tokens: Sequence[int], pos: int, width: int, rows: int) -> np.ndarray | None:
        """Evaluate ``tokens`` at ``pos`` through ``signature``; the logits of its last ``rows`` tokens."""
        ids, positions = _tokens_and_positions(tokens, pos, width)
        tok_buf, pos_buf, logit_buf = self._buffers(signature)
        tok_buf.write(ids)
        pos_buf.write(positions)
        try:
            self._model.run_by_name(signature, {TOKENS: tok_buf, INPUT_POS: pos_buf, **self._current},
                                    {LOGITS: logit_buf, **self._spare})
        except RuntimeError as exc:
            raise GenerationError(f"LiteRT failed running {signature}: {str(exc).splitlines()[0]}") from None
        self._current, self._spare = self._spare, self._current
        if not rows:
            return None
        n_vocab = self.layout.n_vocab
        # Rows are read from the start of the buffer: only up to the last real token.
        return logit_buf.read(len(tokens) * n_vocab, np.float32).reshape(len(tokens), n_vocab)[-rows:]

    def close(self) -> None:
        # The LiteRT environment logs each accelerator it tears down when the last reference goes.
        with quiet_native_stderr():
            for buffers in (self._current, self._spare, *self._io.values()):
                for buf in buffers.values() if isinstance(buffers, dict) else buffers:
                    buf.destroy()
            self._current, self._spare, self._io = {}, {}, {}
            self._model.close()
            self._model = None


class InterpreterEngine:
    """The classic TFLite ``Interpreter`` and its signature runners (numpy KV cache)."""

    kind = "interpreter"

    def __init__(self, layout: TfliteLayout, n_threads: int, package: str) -> None:
        module = "ai_edge_litert.interpreter" if package == "ai-edge-litert" else "tflite_runtime.interpreter"
        interpreter_cls = importlib.import_module(module).Interpreter
        self.layout = layout
        self.weight_cache = None
        with quiet_native_stderr() as log:
            try:
                self._interpreter = interpreter_cls(model_path=str(layout.path), num_threads=n_threads)
            except (RuntimeError, ValueError) as exc:
                raise RuntimeError(_native_error(log) or str(exc)) from None
        decode = layout.signatures[DECODE]
        self._kv = {
            name: np.zeros(info.shape, dtype=np.float16 if info.dtype == "float16" else np.float32)
            for name, info in decode.inputs.items() if name.startswith("kv_cache_")
        }
        self._runners: dict[str, Any] = {}

    def run(self, signature: str, tokens: Sequence[int], pos: int, width: int, rows: int) -> np.ndarray | None:
        """Evaluate ``tokens`` at ``pos`` through ``signature``; the logits of its last ``rows`` tokens."""
        runner = self._runners.get(signature)
        if runner is None:
            runner = self._runners[signature] = self._interpreter.get_signature_runner(signature)
        ids, positions = _tokens_and_positions(tokens, pos, width)
        try:
            out = runner(**{TOKENS: ids, INPUT_POS: positions}, **self._kv)
        except (RuntimeError, ValueError) as exc:
            raise GenerationError(f"TFLite failed running {signature}: {str(exc).splitlines()[0]}") from None
        for name in self._kv:
            self._kv[name] = out[name]
        return out[LOGITS][0, len(tokens) - rows : len(tokens)] if rows else None

    def close(self) -> None:
        self._runners.clear()
        self._kv.clear()
        self._interpreter = None
