"""The ``edgert`` click group: the one place that turns our errors into ``error:``/``hint:`` lines and
exit codes, never a traceback."""

from __future__ import annotations

import os
import sys
from typing import Any

import click

from edge_runtime.errors import EdgeRuntimeError


def _report(exc: EdgeRuntimeError) -> None:
    click.echo(f"error: {exc.message}", err=True)
    if exc.hint:
        click.echo(f"hint: {exc.hint}", err=True)


class EdgertGroup(click.Group):
    """A click group that turns our errors into one line and an exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except EdgeRuntimeError as exc:
            if os.environ.get("EDGERT_DEBUG"):
                raise
            _report(exc)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # The reader went away (`edgert run ... | head`): nothing left to say.
            sys.stderr.close()
            ctx.exit(0)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # a bug: say so in one line, show the trace to developers
            if os.environ.get("EDGERT_DEBUG"):
                raise
            click.echo(f"error: internal error: {type(exc).__name__}: {exc}", err=True)
            click.echo("hint: EDGERT_DEBUG=1 shows the traceback; please report it", err=True)
            ctx.exit(1)


@click.group(cls=EdgertGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-runtime", prog_name="edgert")
def cli() -> None:
    """Run language models on this device, offline."""
