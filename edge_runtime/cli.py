"""The ``edgert`` command: parse, call the library, print. Errors are translated here, once."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from .errors import EdgeRuntimeError


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


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that loads a model and generates."""
    options = [
        click.option("--model", "-m", "model", default=None,
                     help="A .gguf file or a model name (default: smollm2, the embedded model)."),
        click.option("--backend", default=None, help="Force a backend (llama.cpp, onnx, tflite)."),
        click.option("--ctx", type=click.IntRange(min=16), default=None,
                     help="Context size in tokens (default: the plan's, from the device profile)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: physical cores)."),
        click.option("--temp", type=click.FloatRange(min=0.0), default=0.7, show_default=True,
                     help="Sampling temperature; 0 is greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=40, show_default=True),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0), default=0.95, show_default=True),
        click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.05, show_default=True),
        click.option("--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True),
                     default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Sampling seed (default: random)."),
        click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                     help="Most tokens per answer."),
        click.option("--stats", is_flag=True, help="After each answer, a key=value line on stderr."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def make_plan(opts: dict[str, Any], profile_id: str | None = None, *, parallel: int = 1) -> Any:
    """Detect the device, match its profile and plan the model named by the options."""
    from .device import detect
    from .planner import PlanRequest, choose_plan
    from .profiles import get_profile, match_profile
    from .model_spec import find_artifacts

    artifacts = find_artifacts(opts["model"])
    device = detect()
    profile = get_profile(profile_id) if profile_id else match_profile(device)
    request = PlanRequest(ctx=opts.get("ctx"), threads=opts.get("threads"), backend=opts.get("backend"),
                          n_parallel=parallel)
    return choose_plan(artifacts, device, profile, request)


def _load(opts: dict[str, Any]) -> tuple[Any, Any]:
    """(model, plan): the planned artifact loaded on the planned backend."""
    from .backends import load_backend

    plan = make_plan(opts)
    return load_backend(plan.backend).load(plan.artifact.path, plan.settings), plan


def _sampling(opts: dict[str, Any]) -> Any:
    from .backends.base import SamplingParams

    return SamplingParams(
        max_tokens=opts["max_tokens"], temperature=opts["temp"], top_k=opts["top_k"],
        top_p=opts["top_p"], min_p=opts["min_p"], repeat_penalty=opts["repeat_penalty"],
        seed=opts["seed"],
    )


@cli.command()
@click.argument("prompt")
@model_options
@click.option("--chat", "as_chat", is_flag=True, help="Wrap PROMPT in the model's chat template.")
@click.option("--system", default=None, help="System prompt (with --chat).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of the text.")
def run(prompt: str, as_chat: bool, system: str | None, as_json: bool, **opts: Any) -> None:
    """Complete PROMPT once and print the completion."""
    from .chat import stats_line
    from .session import Session

    model, plan = _load(opts)
    params = _sampling(opts)
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
        click.echo(json.dumps({
            "model": plan.artifact.label, "text": "".join(pieces),
            "finish_reason": last.finish_reason if last else None,
            "stats": stats.to_dict() if stats else None,
        }))
    else:
        sys.stdout.write("\n")
    if opts["stats"] and stats:
        click.echo(stats_line(stats), err=True)
    model.close()


@cli.command()
@model_options
@click.option("--system", default=None, help="System prompt.")
def chat(system: str | None, **opts: Any) -> None:
    """Chat with a model in the terminal (one message per line when piped)."""
    from .chat import ChatLoop
    from .session import Session

    model, plan = _load(opts)
    interactive = sys.stdin.isatty()
    notice = functools.partial(click.echo, err=True)
    session = Session(model, system=system, params=_sampling(opts),
                      on_notice=lambda msg: notice(f"note: {msg}"))
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


def _register_subcommands() -> None:
    from .cli_bench import bench, device_test, report
    from .cli_convert import convert, eval_
    from .cli_inspect import device, models, plan, profiles
    from .cli_serve import serve

    for command in (device, profiles, plan, models, serve, convert, eval_, bench, report, device_test):
        cli.add_command(command)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgert")


if __name__ == "__main__":
    main()
