"""``edgert serve``: the OpenAI-compatible API on loopback (or elsewhere, with a key)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click

from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
@click.option("--model", "-m", default=None, help="A .gguf file or a model name (default: smollm2).")
@click.option("--backend", default=None, help="Force a backend (llama.cpp, onnx, tflite).")
@click.option("--ctx", type=click.IntRange(min=16), default=None, help="Context of each conversation (slot).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--api-key", default=None, help="Require Authorization: Bearer KEY.")
@click.option("--api-key-file", default=None, type=click.Path(dir_okay=False), help="Read the key from a file.")
@click.option("--insecure-no-auth", is_flag=True, help="Allow a non-loopback bind without a key.")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Generations at once (continuous batching).")
@click.option("--queue", "queue_size", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a slot; more get 429.")
@click.option("--queue-timeout", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
              help="Seconds a request may wait for a slot before a 503.")
@click.option("--allow-origin", "allow_origins", multiple=True, help="Send CORS headers for this origin.")
def serve(host: str, port: int, api_key: str | None, api_key_file: str | None, insecure_no_auth: bool,
          parallel: int, queue_size: int, queue_timeout: float, allow_origins: tuple[str, ...], **opts: Any) -> None:
    """Serve the OpenAI API (chat, completions, models) to local apps."""
    key = read_api_key(api_key, api_key_file)
    if not is_loopback(host) and key is None and not insecure_no_auth:
        raise EdgeRuntimeError(f"binding {host} exposes the model to the network without an API key",
                               "add --api-key/--api-key-file, bind 127.0.0.1, or pass --insecure-no-auth")
    if not is_loopback(host) and key is None:
        click.echo(f"warning: serving on {host} with no API key: anyone who can reach it may use it", err=True)

    import uvicorn

    from edge_runtime.backends import load_backend
    from edge_runtime.cli.options import plan_from_options
    from edge_runtime.server.app import ServerConfig, create_app

    plan = plan_from_options(opts, parallel=parallel)
    s, a = plan.settings, plan.artifact
    model_id = f"{a.name}-{a.quant}" if a.quant else a.name
    click.echo(f"plan: {plan.backend} · {a.label} · ctx {s.n_ctx} × {parallel} slots · threads {s.n_threads}"
               f" · est. {plan.memory.total_bytes / 2**20:.0f} MiB", err=True)
    config = ServerConfig(model_id=model_id, parallel=parallel, queue_size=queue_size,
                          queue_timeout_s=queue_timeout, api_key=key, allow_origins=allow_origins)
    app = create_app(config, lambda: load_backend(plan.backend).load(a.path, s))
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving {model_id} on http://{shown}:{port}/v1 (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)
