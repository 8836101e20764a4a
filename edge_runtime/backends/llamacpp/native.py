"""The private layer over llama-cpp-python's C API: handles, batches, the log (samplers: ``sampler``).

Everything here speaks ctypes; the rest of the backend speaks Python. Pointers are owned by
small classes with an idempotent ``close()``; return codes become typed errors.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Iterator, Sequence

import llama_cpp as _c
import numpy as np

from edge_runtime.backends.base import KV_CACHE_TYPES, Settings
from edge_runtime.errors import GenerationError, ModelLoadError

log = logging.getLogger("edge_runtime.llama_cpp")

_LOG_LEVELS = {2: logging.ERROR, 3: logging.WARNING, 4: logging.INFO, 5: logging.DEBUG}
_recent_errors: deque[str] = deque(maxlen=8)
_log_line: list[str] = []  # llama.cpp sends some lines in pieces (GGML_LOG_LEVEL_CONT)
_init_lock = threading.Lock()
_initialized = False


@_c.llama_log_callback
def _route_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    message = text.decode("utf-8", errors="replace")
    _log_line.append(message)
    if not message.endswith("\n"):
        return
    line = "".join(_log_line).rstrip()
    _log_line.clear()
    py_level = _LOG_LEVELS.get(level, logging.DEBUG)
    if py_level >= logging.ERROR:
        _recent_errors.append(line)
    # llama.cpp is chatty at every level; keep it out of the user's way unless asked for.
    log.log(logging.DEBUG if py_level < logging.ERROR else logging.INFO, "%s", line)


def ensure_initialized() -> None:
    """Route llama.cpp's log to our logger and initialise its backends, once per process."""
    global _initialized
    with _init_lock:
        if _initialized:
            return
        _c.llama_log_set(_route_log, ctypes.c_void_p(0))
        _c.llama_backend_init()
        _initialized = True


def take_recent_errors() -> str:
    """The errors llama.cpp logged since the last call, joined (for error messages)."""
    text = "; ".join(_recent_errors)
    _recent_errors.clear()
    return text


def library_version() -> str:
    return getattr(_c, "__version__", "unknown")


def supports_gpu_offload() -> bool:
    return bool(_c.llama_supports_gpu_offload())


def system_info() -> str:
    """The CPU features (and GPU backends) this llama.cpp build uses here: its kernels follow them."""
    return _c.llama_print_system_info().decode("utf-8", errors="replace").strip().rstrip("|").strip()


class NativeModel:
    """Owns a ``llama_model`` pointer."""

    def __init__(self, path: str, settings: Settings) -> None:
        ensure_initialized()
        params = _c.llama_model_default_params()
        params.n_gpu_layers = settings.n_gpu_layers
        # 0.3.x replaced the use_mmap field with load_mode; ctypes would accept a stray
        # attribute silently, so set the field llama.cpp actually reads.
        params.load_mode = _c.LLAMA_LOAD_MODE_MMAP if settings.use_mmap else _c.LLAMA_LOAD_MODE_NONE
        placement: tuple[object, ...] = ()  # arrays the params point into, alive until loaded
        if settings.rpc_servers:  # only in the process that hosts a split model (rpc.py says why)
            from edge_runtime.backends.llamacpp import rpc

            placement = rpc.place_on_workers(params, settings.rpc_servers, settings.tensor_split)
        take_recent_errors()
        ptr = _c.llama_model_load_from_file(path.encode(), params)
        del placement
        if not ptr:
            why = take_recent_errors() or "llama.cpp could not load it"
            raise ModelLoadError(f"{path}: {why}", "check that the file is a complete GGUF model")
        self.ptr = ptr
        self.vocab = _c.llama_model_get_vocab(ptr)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = _c.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            _c.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace")

    def chat_template(self) -> str | None:
        raw = _c.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", errors="replace") if raw else None

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (_c.llama_token * capacity)()
        n = _c.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (_c.llama_token * capacity)()
            n = _c.llama_tokenize(
                self.vocab, data, len(data), buf, capacity, add_special, parse_special
            )
        return list(buf[:n])

    def token_to_piece(self, token: int, buf: ctypes.Array, *, special: bool = False) -> bytes:
        """The bytes of one token (a piece of a UTF-8 character stays that piece); a control
        token renders as its text only with ``special``."""
        n = _c.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            bigger = ctypes.create_string_buffer(-n)
            n = _c.llama_token_to_piece(self.vocab, token, bigger, len(bigger), 0, special)
            return bigger.raw[:n]
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``, control tokens included, so it tokenizes back to the same ids."""
        arr = (_c.llama_token * len(tokens))(*tokens)
        capacity = max(64, len(tokens) * 8)
        for _ in range(2):
            out = ctypes.create_string_buffer(capacity)
            n = _c.llama_detokenize(self.vocab, arr, len(tokens), out, capacity, False, True)
            if n >= 0:
                return out.raw[:n].decode("utf-8", errors="replace")
            capacity = -n
        raise GenerationError("could not detokenize the tokens")

    def close(self) -> None:
        if self.ptr:
            _c.llama_model_free(self.ptr)
            self.ptr = None


# Sliding-window layers keep only the window (see NativeContext); part of a saved state's key.
SWA_FULL = False


class NativeContext:
    """Owns a ``llama_context`` and a reusable ``llama_batch``."""

    def __init__(self, model: NativeModel, settings: Settings, n_threads: int) -> None:
        params = _c.llama_context_default_params()
        params.n_ctx = settings.n_ctx * settings.n_parallel
        params.n_batch = settings.n_batch
        params.n_ubatch = min(settings.n_ubatch, settings.n_batch)
        params.n_seq_max = settings.n_parallel
        # One KV store shared by every slot: with a store per sequence llama.cpp splits a batch
        # into one compute per sequence unless the ids come in order, which undoes batching.
        # Each slot still stops at its own n_ctx (the model checks positions).
        params.kv_unified = settings.n_parallel > 1
        # Generation reads one row of logits per sequence and step; without this cap llama.cpp
        # reserves logits for a whole batch (hundreds of MiB of VRAM for a large vocabulary).
        params.n_outputs_max = settings.n_parallel
        params.n_threads = n_threads
        params.n_threads_batch = settings.n_threads_batch or n_threads
        params.flash_attn_type = (
            _c.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else _c.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = KV_CACHE_TYPES[settings.type_k]
        params.type_v = KV_CACHE_TYPES[settings.type_v]
        params.no_perf = True
        # The C API's default keeps a full-size cache for sliding-window layers; llama.cpp's own
        # tools keep only the window (much less memory) and so do we: the backend checks what
        # the window still holds before it reuses a prefix.
        params.swa_full = SWA_FULL
        self.ptr = ptr = _new_context(model, params, "a context", "try a smaller --ctx or another KV cache type")
        self.memory = _c.llama_get_memory(ptr)
        self.n_ctx = _c.llama_n_ctx(ptr)
        self.n_batch = settings.n_batch
        self.batch = _c.llama_batch_init(self.n_batch, 0, settings.n_parallel)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """Evaluate ``(token, pos, seq_id, wants_logits)`` entries in one ``llama_decode``."""
        batch = self.batch
        tok, pos, nseq, seq, logits = batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        for i, (t, p, s, want) in enumerate(entries):
            tok[i] = t
            pos[i] = p
            nseq[i] = 1
            seq[i][0] = s
            logits[i] = want
        batch.n_tokens = len(entries)
        rc = _c.llama_decode(self.ptr, batch)
        if rc != 0:
            why = {1: "no room left in the KV cache", 2: "aborted"}.get(rc, f"error code {rc}")
            raise GenerationError(f"llama.cpp could not evaluate {len(entries)} tokens: {why}")

    def seq_remove(self, seq_id: int, start: int) -> bool:
        """Drop positions ``start..`` of one sequence; False when the cache cannot trim there."""
        return bool(_c.llama_memory_seq_rm(self.memory, seq_id, start, -1))

    def seq_clear(self, seq_id: int) -> None:
        _c.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def seq_pos_min(self, seq_id: int) -> int:
        return int(_c.llama_memory_seq_pos_min(self.memory, seq_id))

    def seq_copy(self, src: int, dst: int, end: int) -> None:
        """Let sequence ``dst`` share positions ``0..end-1`` of ``src`` (no evaluation, no copy of
        the cells in a unified cache)."""
        _c.llama_memory_seq_cp(self.memory, src, dst, 0, end)

    def seq_state_size(self, seq_id: int) -> int:
        """Bytes ``seq_state`` would copy (``llama_state_seq_get_size``)."""
        return int(_c.llama_state_seq_get_size(self.ptr, seq_id))

    def seq_state(self, seq_id: int) -> memoryview:
        """The KV state of one sequence (``llama_state_seq_get_data``), for ``set_seq_state``."""
        size = self.seq_state_size(seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = _c.llama_state_seq_get_data(self.ptr, buf, size, seq_id)
        return memoryview(buf).cast("B")[:n]

    def set_seq_state(self, seq_id: int, state: memoryview | bytes | bytearray) -> bool:
        """Replace one sequence's cache with a saved state (read in place, read-only views
        included); False when llama.cpp refuses it (the sequence is then cleared)."""
        data = np.frombuffer(state, dtype=np.uint8)
        src = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if _c.llama_state_seq_set_data(self.ptr, src, data.size, seq_id) == data.size:
            return True
        self.seq_clear(seq_id)
        return False

    def logits_row(self, index: int, n_vocab: int) -> np.ndarray:
        """The raw logits of batch row ``index`` of the last decode: a view the next decode overwrites."""
        return np.ctypeslib.as_array(_c.llama_get_logits_ith(self.ptr, index), shape=(n_vocab,))

    def close(self) -> None:
        if self.ptr:
            _c.llama_batch_free(self.batch)
            _c.llama_free(self.ptr)
            self.ptr = None


# Most floats one scoring batch may return (its logits are copied once): 128 MiB of float32.
_MAX_SCORED_FLOATS = 32 << 20


class ScoringContext:
    """A second context on a model that returns the logits of every position, for quality scoring.

    A generation context keeps one output row per sequence; this one keeps a whole batch's
    (``n_outputs_max_per_seq = 0``) and decodes as ``llama-perplexity`` does: batches of up to 512
    tokens from position 0, flash attention as llama.cpp's ``auto`` decides it.
    """

    def __init__(self, model: NativeModel, n_ctx: int, n_threads: int, n_threads_batch: int,
                 type_k: str = "f16", type_v: str = "f16") -> None:
        self.n_vocab = vocab_size(model.vocab)
        self.n_batch = min(n_ctx, 512, max(32, _MAX_SCORED_FLOATS // max(1, self.n_vocab)))
        params = _c.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = params.n_outputs_max = self.n_batch
        params.n_outputs_max_per_seq = 0  # = n_outputs_max: every scored position in a batch
        params.n_seq_max = 1
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        params.flash_attn_type = _c.LLAMA_FLASH_ATTN_TYPE_AUTO
        # The KV type of the settings, so the evaluator can measure what a quantized cache costs;
        # llama.cpp needs flash attention for a quantized V cache.
        params.type_k, params.type_v = KV_CACHE_TYPES[type_k], KV_CACHE_TYPES[type_v]
        if type_v not in ("f32", "f16", "bf16"):
            params.flash_attn_type = _c.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.no_perf = True
        self.ptr = ptr = _new_context(model, params, "a scoring context", "try a smaller --ctx")
        self.memory = _c.llama_get_memory(ptr)
        self.batch = _c.llama_batch_init(self.n_batch, 0, 1)

    def logit_rows(self, tokens: Sequence[int], first: int) -> Iterator[tuple[int, np.ndarray]]:
        """Decode ``tokens`` from position 0; per batch, the first scored position and a float32
        copy of the rows of positions ``first..`` in it."""
        _c.llama_memory_clear(self.memory, True)
        batch = self.batch
        for start in range(0, len(tokens), self.n_batch):
            end = min(start + self.n_batch, len(tokens))
            for i, p in enumerate(range(start, end)):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tokens[p], p, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = p >= first
            batch.n_tokens = end - start
            rc = _c.llama_decode(self.ptr, batch)
            if rc != 0:
                raise GenerationError(f"llama.cpp could not evaluate {end - start} tokens (code {rc})")
            scored_from = max(start, first)
            if scored_from < end:
                rows = np.ctypeslib.as_array(_c.llama_get_logits(self.ptr), shape=(end - scored_from, self.n_vocab))
                yield scored_from, rows.copy()  # the next decode overwrites it

    def close(self) -> None:
        if self.ptr:
            _c.llama_batch_free(self.batch)
            _c.llama_free(self.ptr)
            self.ptr = None


def quantize(src: str, dst: str, *, ftype: int, nthread: int, allow_requantize: bool) -> tuple[int, str]:
    """``llama_model_quantize`` (one blocking call); its status and the error lines it logged."""
    ensure_initialized()
    take_recent_errors()
    params = _c.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = ftype
    params.allow_requantize = allow_requantize
    rc = _c.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    return int(rc), take_recent_errors()


def _new_context(model: NativeModel, params: _c.llama_context_params, what: str, hint: str) -> _c.llama_context_p:
    """A llama.cpp context for ``model`` with ``params``, or a ModelLoadError saying what llama.cpp logged."""
    take_recent_errors()
    ptr = _c.llama_init_from_model(model.ptr, params)
    if not ptr:
        why = take_recent_errors() or "llama.cpp could not create a context"
        raise ModelLoadError(f"could not create {what} of {params.n_ctx} tokens: {why}", hint)
    return ptr


def is_end_of_generation(vocab: object, token: int) -> bool:
    return bool(_c.llama_vocab_is_eog(vocab, token))


def vocab_size(vocab: object) -> int:
    return int(_c.llama_vocab_n_tokens(vocab))


def vocab_add_bos(vocab: object) -> bool:
    return bool(_c.llama_vocab_get_add_bos(vocab))


def token_text(vocab: object, token: int) -> str | None:
    if token < 0:
        return None
    raw = _c.llama_vocab_get_text(vocab, token)
    return raw.decode("utf-8", errors="replace") if raw else None


def special_tokens(vocab: object) -> tuple[int, int]:
    return int(_c.llama_vocab_bos(vocab)), int(_c.llama_vocab_eos(vocab))


def model_n_swa(model: NativeModel) -> int:
    return int(_c.llama_model_n_swa(model.ptr))


def model_has_recurrent_state(model: NativeModel) -> bool:
    """Whether the model keeps a recurrent state (Mamba, RWKV; hybrids such as LFM2, Granite-H):
    one state per sequence that cannot be cut back to a position nor shared in part."""
    return bool(_c.llama_model_is_recurrent(model.ptr) or _c.llama_model_is_hybrid(model.ptr))


def model_counts(model: NativeModel) -> tuple[int, int, int]:
    """(n_ctx_train, n_params, size_bytes) as llama.cpp reports them."""
    return (
        int(_c.llama_model_n_ctx_train(model.ptr)),
        int(_c.llama_model_n_params(model.ptr)),
        int(_c.llama_model_size(model.ptr)),
    )
