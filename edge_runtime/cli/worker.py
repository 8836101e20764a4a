"""``edgert worker``: lend this machine's CPU and memory to a model split across devices."""

from __future__ import annotations

import click

from edge_runtime.cli.options import THREADS, WholeNumber


@click.command()
@click.option("--host", default=None,
              help="Address to listen on (default 127.0.0.1, this machine only). llama.cpp's RPC protocol has no "
                   "authentication: anyone who reaches a worker can use it and read what it holds.")
@click.option("--port", type=WholeNumber(1, 65535), default=50052, show_default=True)
@click.option("--threads", type=THREADS, default=None,
              help="CPU threads, at most the logical CPUs (default: physical cores).")
def worker(host: str | None, port: int, threads: int | None) -> None:
    """Serve this machine's CPU to llama.cpp elsewhere (`--workers HOST:PORT` on run, chat, serve, plan, bench).

    One client at a time; it runs until stopped (Ctrl-C). Needs llama.cpp's RPC backend:
    scripts/enable_rpc.sh builds it.
    """
    from edge_runtime.backends.base import default_threads
    from edge_runtime.backends.llamacpp import rpc
    from edge_runtime.server.access import is_loopback

    bind = host or "127.0.0.1"
    rpc.parse_workers(f"{bind}:{port}")  # an address llama.cpp can parse, or a clear error
    rpc.require_library()
    if not is_loopback(bind):
        click.echo(f"warning: serving on {bind}: llama.cpp's RPC protocol has no authentication, so anyone who "
                   f"can reach {bind}:{port} can run code on this worker's memory and read the model; use it on a "
                   "network you trust", err=True)
    threads = threads or default_threads()
    click.echo(f"worker: serving this machine's CPU ({threads} threads) on {bind}:{port}, one client at a time; "
               f"use it with --workers {bind}:{port} (Ctrl-C stops)", err=True)
    rpc.serve_worker(bind, port, threads)
