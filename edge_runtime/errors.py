"""One exception tree for everything a user can cause.

Each error carries a message written for the user and, where it helps, a hint saying what to do.
The CLI prints them as ``error: ...`` / ``hint: ...`` and exits with ``exit_code``; the server maps
them to ``http_status`` with an OpenAI-shaped error body.
"""

from __future__ import annotations


class EdgeRuntimeError(Exception):
    """Base of every error the user can cause; never shown as a traceback."""

    exit_code: int = 1
    http_status: int = 500
    code: str = "edge_runtime_error"

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ModelNotFoundError(EdgeRuntimeError):
    """A model name, file or folder that does not exist."""

    http_status = 404
    code = "model_not_found"


class InvalidModelFileError(EdgeRuntimeError):
    """A model file that is not what it claims to be (bad magic, truncated, inconsistent)."""

    http_status = 400
    code = "invalid_model_file"


class ModelFormatError(InvalidModelFileError):
    """A model file that passed our checks but killed (or hung) its runtime in a trial load."""


class UnsupportedModelError(EdgeRuntimeError):
    """A well-formed model the backend cannot run (unknown architecture, missing tokenizer)."""

    http_status = 400
    code = "unsupported_model"


class BackendUnavailableError(EdgeRuntimeError):
    """A backend whose runtime is not installed or cannot run here."""

    http_status = 503
    code = "backend_unavailable"


class ModelLoadError(EdgeRuntimeError):
    """The runtime refused to load a model that passed our own checks."""

    http_status = 500
    code = "model_load_failed"


class ContextLengthExceededError(EdgeRuntimeError):
    """A prompt (plus its reply budget) that does not fit the context window."""

    http_status = 400
    code = "context_length_exceeded"

    def __init__(self, n_tokens: int, n_ctx: int, hint: str | None = None) -> None:
        super().__init__(
            f"the prompt is {n_tokens} tokens but the context holds {n_ctx}",
            hint or "shorten the message or start with a larger --ctx",
        )
        self.n_tokens = n_tokens
        self.n_ctx = n_ctx


class InvalidRequestError(EdgeRuntimeError):
    """A request the model cannot take as given: an empty prompt, a token outside the vocabulary."""

    http_status = 400
    code = "invalid_request_error"


class GenerationError(EdgeRuntimeError):
    """The runtime failed while evaluating tokens (for example, out of KV cache space)."""

    http_status = 500
    code = "generation_failed"


class WorkerUnavailableError(EdgeRuntimeError):
    """A llama.cpp RPC worker holding part of a model cannot be reached, or went away mid-answer."""

    http_status = 503
    code = "worker_unavailable"


class SlotsBusyError(EdgeRuntimeError):
    """Every sequence of a model is busy and the wait for one ran out."""

    http_status = 503
    code = "server_busy"


class InvalidConfigError(EdgeRuntimeError):
    """A profile, manifest, conversation file or option value that is malformed."""

    http_status = 400
    code = "invalid_config"


class DoesNotFitError(EdgeRuntimeError):
    """Nothing the planner could choose fits this device's memory."""

    exit_code = 3
    http_status = 503
    code = "does_not_fit"
