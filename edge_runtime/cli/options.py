"""Options shared by the commands that load a model and generate, and what they turn into: a
plan, a loaded model, sampling parameters."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click


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


def plan_from_options(opts: dict[str, Any], profile_id: str | None = None, *, parallel: int = 1) -> Any:
    """The plan for the model and overrides the options name (``edge_runtime.plan``)."""
    from edge_runtime import plan

    return plan(opts["model"], backend=opts.get("backend"), ctx=opts.get("ctx"), threads=opts.get("threads"),
                parallel=parallel, profile=profile_id)


def load_planned(opts: dict[str, Any]) -> tuple[Any, Any]:
    """(model, plan): the planned artifact loaded on the planned backend."""
    from edge_runtime.backends import load_backend

    chosen = plan_from_options(opts)
    return load_backend(chosen.backend).load(chosen.artifact.path, chosen.settings), chosen


def sampling_params(opts: dict[str, Any]) -> Any:
    """The sampling options as ``SamplingParams``."""
    from edge_runtime.backends.base import SamplingParams

    return SamplingParams(
        max_tokens=opts["max_tokens"], temperature=opts["temp"], top_k=opts["top_k"],
        top_p=opts["top_p"], min_p=opts["min_p"], repeat_penalty=opts["repeat_penalty"],
        seed=opts["seed"],
    )
