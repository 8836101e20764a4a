"""``edgert run`` and ``edgert chat``: one completion, or a conversation in the terminal."""

from __future__ import annotations

import functools
import sys
from typing import Any

import click

from edge_runtime.cli.options import (
    JSON_SCHEMA,
    RESPONSE_CACHE,
    load_planned,
    model_options,
    prompt_cache_options,
    sampling_params,
)
from edge_runtime.cli.output import print_json


@click.command()
@click.argument("prompt")
@model_options
@JSON_SCHEMA
@click.option("--chat", "as_chat", is_flag=True, help="Wrap PROMPT in the model's chat template.")
@click.option("--system", default=None, help="System prompt (with --chat).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the text.")
@RESPONSE_CACHE
@prompt_cache_options
def run(prompt: str, as_chat: bool, system: str | None, as_json: bool, response_cache: bool, **opts: Any) -> None:
    """Complete PROMPT once and print the completion."""
    from edge_runtime.cli.chat_loop import stats_line
    from edge_runtime.session import Session

    params = sampling_params(opts)  # a bad --json-schema file fails before the model loads
    loaded, plan = load_planned(opts)
    model = loaded
    if response_cache:
        from edge_runtime.server.response_replay import CachedResponses, ResponseCachedModel

        model = ResponseCachedModel(loaded, CachedResponses(plan.artifact, plan.settings))
    if as_chat:
        stream = Session(model, system=system, params=params).send(prompt)
    else:
        tokens = model.tokenize(prompt, special=True, add_bos=model.info.add_bos)
        stream = model.generate(tokens, params)
    pieces, last = [], None
    for event in stream:
        pieces.append(event.text)
        if not as_json and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        last = event
    stats = last.stats if last else None
    if as_json:
        print_json({
            "model": plan.artifact.label, "text": "".join(pieces),
            "finish_reason": last.finish_reason if last else None,
            "stats": stats.to_dict() if stats else None,
            **({"response_cache": _cache_outcome(model)} if response_cache else {}),
        })
    else:
        sys.stdout.write("\n")
    if opts["stats"] and stats:
        click.echo(stats_line(stats), err=True)
    if response_cache and not as_json:
        click.echo(f"response cache: {_cache_outcome(model)}", err=True)
    loaded.close()


def _cache_outcome(model: Any) -> str:
    """``hit`` (replayed, nothing computed), ``miss`` (computed and stored) or ``skipped`` (not greedy)."""
    hit = model.last_hit
    return "skipped" if hit is None else "hit" if hit else "miss"


@click.command()
@model_options
@JSON_SCHEMA
@click.option("--system", default=None, help="System prompt.")
@click.option("--resume", "resume", metavar="FILE", default=None,
              help="Continue a conversation saved with /save FILE (its KV state comes back from the prompt cache).")
@prompt_cache_options
def chat(system: str | None, resume: str | None, **opts: Any) -> None:
    """Chat with a model in the terminal (one message per line when piped)."""
    from edge_runtime.cli.chat_loop import ChatLoop
    from edge_runtime.session import Session, read_conversation

    params = sampling_params(opts)
    saved = read_conversation(resume) if resume is not None else None  # a bad file fails before the load
    model, plan = load_planned(opts)
    interactive = sys.stdin.isatty()
    notice = functools.partial(click.echo, err=True)
    session = Session(model, system=system, params=params,
                      on_notice=lambda msg: notice(f"note: {msg}"))
    if saved is not None:
        session.restore(saved[0] if system is None else system, saved[1])
        notice(f"resumed {len(session.messages)} messages from {resume}")
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        gpu = "GPU" if plan.settings.n_gpu_layers else "CPU"
        click.echo(f"edge-runtime · {plan.artifact.label} · {plan.backend} ({gpu}, {plan.settings.n_threads} "
                   f"threads) · ctx {model.info.n_ctx}", err=True)
        click.echo("/help lists commands · Ctrl-C stops an answer · Ctrl-D leaves", err=True)
    try:
        ChatLoop(session, interactive=interactive, show_stats=opts["stats"]).run()
    finally:
        model.close()
