"""The private layer over llama-cpp-python's C API: handles, batches, samplers, the log.

Everything here speaks ctypes; the rest of the backend speaks Python. Pointers are owned by
small classes with an idempotent ``close()``; return codes become typed errors.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Sequence

import llama_cpp as _c

from edge_runtime.backends.base import KV_CACHE_TYPES, SamplingParams, Settings
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


class NativeModel:
    """Owns a ``llama_model`` pointer."""

    def __init__(self, path: str, settings: Settings) -> None:
        ensure_initialized()
        params = _c.llama_model_default_params()
        params.n_gpu_layers = settings.n_gpu_layers
        # 0.3.x replaced the use_mmap field with load_mode; ctypes would accept a stray
        # attribute silently, so set the field llama.cpp actually reads.
        params.load_mode = _c.LLAMA_LOAD_MODE_MMAP if settings.use_mmap else _c.LLAMA_LOAD_MODE_NONE
        take_recent_errors()
        ptr = _c.llama_model_load_from_file(path.encode(), params)
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

    def token_to_piece(self, token: int, buf: ctypes.Array) -> bytes:
        n = _c.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            bigger = ctypes.create_string_buffer(-n)
            n = _c.llama_token_to_piece(self.vocab, token, bigger, len(bigger), 0, False)
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
        params.swa_full = False
        take_recent_errors()
        ptr = _c.llama_init_from_model(model.ptr, params)
        if not ptr:
            why = take_recent_errors() or "llama.cpp could not create a context"
            raise ModelLoadError(f"could not create a context of {params.n_ctx} tokens: {why}",
                                 "try a smaller --ctx or another KV cache type")
        self.ptr = ptr
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

    def sample(self, sampler: Sampler, index: int) -> int:
        return int(_c.llama_sampler_sample(sampler.ptr, self.ptr, index))

    def set_threads(self, n_threads: int, n_threads_batch: int) -> None:
        _c.llama_set_n_threads(self.ptr, n_threads, n_threads_batch)

    def close(self) -> None:
        if self.ptr:
            _c.llama_batch_free(self.batch)
            _c.llama_free(self.ptr)
            self.ptr = None


class Sampler:
    """llama.cpp's own sampler chain for one generation (no logits cross into Python)."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        chain = _c.llama_sampler_chain_init(_c.llama_sampler_chain_default_params())
        add = _c.llama_sampler_chain_add
        if params.repeat_penalty != 1.0:
            add(chain, _c.llama_sampler_init_penalties(
                n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.greedy:
            add(chain, _c.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, _c.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(chain, _c.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(chain, _c.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, _c.llama_sampler_init_temp(params.temperature))
            seed = _c.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            add(chain, _c.llama_sampler_init_dist(seed))
        self.ptr = chain
        self.uses_history = params.repeat_penalty != 1.0

    def accept(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            _c.llama_sampler_accept(self.ptr, t)

    def close(self) -> None:
        if self.ptr:
            _c.llama_sampler_free(self.ptr)
            self.ptr = None


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


def model_counts(model: NativeModel) -> tuple[int, int, int]:
    """(n_ctx_train, n_params, size_bytes) as llama.cpp reports them."""
    return (
        int(_c.llama_model_n_ctx_train(model.ptr)),
        int(_c.llama_model_n_params(model.ptr)),
        int(_c.llama_model_size(model.ptr)),
    )
