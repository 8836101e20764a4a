"""``edgert cache list|clear``: the caches on disk under $EDGERT_HOME, both kinds.

``prompt``: saved KV states of evaluated prompts (``prompt-cache/``); ``response``: answers to
exact repeats of greedy requests (``response-cache/``). ``--json`` prints one stable document:
``entries`` (each with its ``kind``) and ``totals`` per kind.
"""

from __future__ import annotations

import time
from typing import Any

import click

from edge_runtime.cli.output import print_json

KINDS = ("prompt", "response")


@click.group()
def cache() -> None:
    """The caches on disk ($EDGERT_HOME/prompt-cache, $EDGERT_HOME/response-cache): list or clear them."""


def _stores() -> dict[str, Any]:
    from edge_runtime.models.prompt_cache import PromptCacheStore
    from edge_runtime.models.response_cache import ResponseCache

    return {"prompt": PromptCacheStore.default(), "response": ResponseCache()}


def _entries(stores: dict[str, Any]) -> list[dict[str, Any]]:
    """Every entry of both caches as plain data, most recently used first."""
    found = [{"kind": "prompt", **e.to_dict()} for e in stores["prompt"].entries()]
    found += [{"kind": "response", "model_key": None, "n_tokens": None, "bytes": size, "last_used": used,
               "path": str(path)}  # the same fields for both kinds: a key that is not known is null
              for path, size, used in stores["response"].entries()]
    return sorted(found, key=lambda e: -e["last_used"])


def _document(stores: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    totals = {kind: {"folder": str(stores[kind].folder), "entries": 0, "bytes": 0} for kind in KINDS}
    for e in entries:
        totals[e["kind"]]["entries"] += 1
        totals[e["kind"]]["bytes"] += e["bytes"]
    return {"entries": entries, "totals": totals, "total_bytes": sum(e["bytes"] for e in entries)}


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the table.")
def list_(as_json: bool) -> None:
    """The entries of both caches, most recently used first."""
    stores = _stores()
    document = _document(stores, _entries(stores))
    if as_json:
        print_json(document)
        return
    for kind, total in document["totals"].items():
        click.echo(f"{kind} cache, {total['folder']}: {total['entries']} entries, {total['bytes'] / 2**20:.1f} MiB")
    for e in document["entries"]:
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["last_used"]))
        what = f"{e['model_key'][:12]}  {e['n_tokens']:>6} tokens" if e["kind"] == "prompt" else f"{'answer':<25}"
        click.echo(f"  {e['kind']:<8}  {what}  {e['bytes'] / 2**20:>8.1f} MiB  {used}")


@cache.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the line.")
def clear(as_json: bool) -> None:
    """Remove every entry of both caches."""
    stores = _stores()
    entries = _entries(stores)
    for kind in KINDS:
        stores[kind].clear()
    document = _document(stores, entries)  # what was removed
    if as_json:
        print_json(document)
        return
    for kind, total in document["totals"].items():
        click.echo(f"removed {total['entries']} {kind} cache entries ({total['bytes'] / 2**20:.1f} MiB) "
                   f"from {total['folder']}")
