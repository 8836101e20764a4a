"""The ``edgert`` command: parse, call the library, print. One module per group of verbs; this one
puts them together under the group (``group.py``) that translates errors."""

from __future__ import annotations

from edge_runtime.cli.bench import bench, device_test, report
from edge_runtime.cli.cache import cache
from edge_runtime.cli.convert import convert, eval_
from edge_runtime.cli.doctor import doctor
from edge_runtime.cli.embed import embed
from edge_runtime.cli.generate import chat, run
from edge_runtime.cli.group import cli
from edge_runtime.cli.inspect import device, models, plan, profiles
from edge_runtime.cli.serve import serve
from edge_runtime.cli.worker import worker

for _command in (run, chat, device, profiles, plan, models, serve, convert, eval_, bench, report, device_test,
                 doctor, worker, embed, cache):
    cli.add_command(_command)

__all__ = ["cli", "main"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgert")
