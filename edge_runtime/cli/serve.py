"""``edgert serve``: the OpenAI-compatible API on loopback (or elsewhere, with a key)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.options import (
    CTX,
    KV_CACHE_TYPE,
    MODEL,
    MODEL_HELP,
    RESPONSE_CACHE,
    THREADS,
    WORKERS,
    FiniteNumber,
    WholeNumber,
    prompt_cache_options,
    with_prompt_cache,
)
from edge_runtime.errors import DoesNotFitError, InvalidConfigError


def read_api_key(api_key: str | None, api_key_file: str | None) -> str | None:
    """The key from --api-key or the first line of --api-key-file."""
    if api_key and api_key_file:
        raise InvalidConfigError("give --api-key or --api-key-file, not both")
    if api_key_file:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InvalidConfigError(f"{api_key_file}: cannot read the API key ({exc.strerror})") from None
        if not key:
            raise InvalidConfigError(f"{api_key_file}: the file is empty")
        return key
    return api_key or None


@click.command()
@click.option("--model", "-m", type=MODEL, default=None, help=MODEL_HELP)
@click.option("--backend", default=None, help="Force a backend (llama.cpp, onnx, tflite).")
@click.option("--ctx", type=CTX, default=None, help="Context of each conversation (slot).")
@click.option("--threads", type=THREADS, default=None, help="CPU threads, at most the logical CPUs.")
@KV_CACHE_TYPE
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=WholeNumber(0, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY.")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False), help="Read the key from a file.")
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback bind without a key.")
@click.option("--parallel", type=WholeNumber(1, 64), default=4, show_default=True,
              help="Generations at once (continuous batching).")
@click.option("--queue", "queue_size", type=WholeNumber(0), default=64, show_default=True,
              help="Requests that may wait for a slot; more get 429.")
@click.option("--queue-timeout", type=FiniteNumber(0.1), default=120.0, show_default=True,
              help="Seconds a request may wait for a slot before a 503.")
@click.option("--allow-origin", "allow_origins", multiple=True,
              help="A web origin (https://app.example) whose pages may call the server: CORS headers for it; "
                   "requests from any other origin get 403. Repeatable.")
@click.option("--allow-host", "allow_hosts", multiple=True,
              help="Answer requests for this host name too (Host header). Without it, a loopback bind answers "
                   "only localhost, 127.0.0.1 and [::1]; any other bind answers every name. Repeatable.")
@click.option("--force", is_flag=True, help="Load even if the plan's memory estimate exceeds the budget.")
@RESPONSE_CACHE
@prompt_cache_options
@click.option("--embedding-model", type=MODEL, default=None,
              help="Serve /v1/embeddings and Ollama's /api/embed with this GGUF (any llama.cpp can pool), beside the "
                   "chat model; the chat model's own file shares its loaded weights.")
@WORKERS
def serve(host: str, port: int, api_key: str | None, api_key_file: str | None, insecure_no_auth: bool,
          parallel: int, queue_size: int, queue_timeout: float, allow_origins: tuple[str, ...],
          allow_hosts: tuple[str, ...], force: bool, response_cache: bool, **opts: Any) -> None:
    """Serve the OpenAI API (chat, completions, models) to local apps.

    Web pages cannot use it: requests for other host names (DNS rebinding) and from web origins
    not named with --allow-origin get 403. A request that would take the process past the memory
    the plan allows gets 503 with Retry-After.
    """
    from edge_runtime.server.access import answered_hosts, is_loopback

    key = read_api_key(api_key, api_key_file)
    if not is_loopback(host) and key is None and not insecure_no_auth:
        raise InvalidConfigError(f"binding {host} exposes the model to the network without an API key",
                               "add --api-key/--api-key-file, bind 127.0.0.1, or pass --insecure-no-auth")
    if not is_loopback(host) and key is None:
        click.echo(f"warning: serving on {host} with no API key: anyone who can reach it may use it", err=True)

    from edge_runtime.backends import open_artifact
    from edge_runtime.server.admission import process_rss
    from edge_runtime.server.app import ServerConfig, create_app
    from edge_runtime.server.listen import uvicorn_server
    from edge_runtime.server.response_replay import CachedResponses

    rss_before_load = process_rss()
    plan = _plan(opts, parallel, force)
    s, a = plan.settings, plan.artifact
    model_id = _served_id(a)
    embedding_model = opts.pop("embedding_model")
    embedding_plan, embedding_bytes = _embedding_plan(embedding_model, opts, plan) if embedding_model else (None, 0)
    # The process may grow by what the plan allowed: the budget, or (forced) the estimate; plus the
    # embedding model, so that chat requests are not refused for the memory it holds.
    memory_limit = rss_before_load + max(plan.budget_bytes, plan.memory.total_bytes) + embedding_bytes
    click.echo(f"plan: {plan.backend} · {a.label} · ctx {s.n_ctx} × {parallel} slots · threads {s.n_threads}"
               f" · est. {plan.memory.total_bytes / 2**20:.0f} MiB · limit {memory_limit / 2**20:.0f} MiB"
               + (f" · workers {', '.join(s.rpc_servers)}" if s.rpc_servers else ""), err=True)
    config = ServerConfig(model_id=model_id, parallel=parallel, queue_size=queue_size,
                          queue_timeout_s=queue_timeout, api_key=key, allow_origins=allow_origins,
                          allowed_hosts=answered_hosts(host, allow_hosts), memory_limit_bytes=memory_limit,
                          embedding_model_id=_served_id(embedding_plan.artifact) if embedding_plan else None,
                          response_cache=CachedResponses(a, s) if response_cache else None)
    load_embedder = None
    if embedding_plan is not None:
        from edge_runtime.backends import open_embedder

        e = embedding_plan  # the chat model lends its weights when it is the same file
        load_embedder = lambda chat: open_embedder(e.artifact, e.settings, beside=chat)
    app = create_app(config, lambda: with_prompt_cache(open_artifact(a, s, backend=plan.backend), opts),
                     load_embedder)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {model_id} on http://{shown}:{port}/v1 (Ctrl-C stops)", err=True)
    uvicorn_server(app, host, port).run()


def _served_id(artifact: Any) -> str:
    """The id clients name a model by: its name and quant."""
    return f"{artifact.name}-{artifact.quant}" if artifact.quant else artifact.name


def _embedding_plan(model: str, opts: dict[str, Any], chat: Any) -> tuple[Any, int]:
    """The plan of the embedding model (llama.cpp, its own context, the chat model's threads), and
    the bytes it adds (its context only, when it shares the chat model's weights)."""
    import os

    from edge_runtime.cli.embed import embedding_memory_bytes, embedding_plan

    chosen = embedding_plan(model, None, opts.get("threads"))
    shared = (chat.backend == "llama.cpp" and not chat.settings.rpc_servers
              and os.path.realpath(chosen.artifact.path) == os.path.realpath(chat.artifact.path))
    memory = embedding_memory_bytes(chosen, shared=shared)
    click.echo(f"embeddings: {chosen.artifact.label} · ctx {chosen.settings.n_ctx}"
               f"{' · threads halved, weights shared' if shared else ''} · est. {memory / 2**20:.0f} MiB", err=True)
    return chosen, memory


def _plan(opts: dict[str, Any], parallel: int, force: bool) -> Any:
    """The plan; settings the user forced beyond the memory budget are refused unless ``force``."""
    from edge_runtime.cli.options import plan_from_options

    try:
        return plan_from_options(opts, parallel=parallel, force=force)
    except DoesNotFitError as exc:
        exc.hint = f"{exc.hint}, or pass --force to load it anyway"
        raise
