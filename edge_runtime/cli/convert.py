"""``edgert convert`` and ``edgert eval``: build a model's artifacts per profile, measure quality."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.options import CTX, MODEL, THREADS, CommaList, WholeNumber
from edge_runtime.cli.output import ProgressRows, print_json

MB = 1_000_000


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Let ``kill`` (SIGTERM) unwind like Ctrl-C, so temporary files are removed on the way out."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _show_build_event(rows: ProgressRows, event: Any) -> None:
    """One ``BuildEvent`` as a row per step (hashing, converting, each quant, evaluating)."""
    total = max(event.total, 1)
    done = total if event.reused or event.finished else min(event.done, total)
    note = "reused" if event.reused else (_amount(event.total) if event.stage == "converting" else "")
    rows.show(f"{event.stage:<11} {event.label:<24}", done, total, note)


def _amount(total: int) -> str:
    return f"{total / MB:.0f} MB" if total > 10 * MB else ""


_CONVERT_HELP = """Convert SRC (a HF folder, a .gguf file or a model name) into the artifacts profiles need.

\b
Formats (--format, comma-separated) and their recipes (--quant names):
  gguf    llama.cpp types: Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q4_0, Q4_1, IQ4_NL, Q3_K_M, Q2_K, ...
  tflite  LiteRT: int8 (dynamic_int8), int4 (dynamic_int4_block32), fp16 (fp16), f32 (none)
  onnx    onnxruntime-genai: int8, int4, fp32
Default formats: those the named profiles' backend orders list and have a quant ladder for;
without --profile, gguf only. A --quant name applies to the formats that know it
(Q4_0,int8 builds GGUF Q4_0 and TFLite/ONNX int8). --outtype is the unquantized base of every
format (f32: TFLite f32 and ONNX fp32 too; f16/bf16: TFLite fp16, ONNX fp32, built only when
that format gets no other type, or as the quality reference of a build without gguf).
Quality (perplexity with --text, KLD and top-1) is measured for every artifact, on the same
tokens, against the gguf base (else the first format's base), through each format's runtime.
"""


@click.command(help=_CONVERT_HELP)
@click.argument("src", required=False)
@click.option("--format", "formats", default=None,
              help="Comma-separated formats: gguf, tflite, onnx (default: the profiles' backends, else gguf).")
@click.option("--tflite-kv-len", type=WholeNumber(2), default=None,
              help="TFLite: the exported KV cache, i.e. the context (default: min(1024, the model's)).")
@click.option("--tflite-prefill", type=CommaList(WholeNumber(1)), default=None,
              help="TFLite: prefill signature lengths (default 8,64,256; those below the KV length).")
@click.option("--onnx-provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX: the execution provider the graph is built for.")
@click.option("--profile", "profiles", multiple=True,
              help="Build the rungs this profile's quant ladder asks for (repeatable).")
@click.option("--all-profiles", is_flag=True, help="Build for every known profile.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Output folder (default: ./out/<model>/).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16"]), default="f16", show_default=True,
              help="The unquantized base every rung is made from.")
@click.option("--quant", "quants", default=None,
              help="Comma-separated types of any format (Q4_0,Q8_0,int8,int4,...); replaces the profiles' rungs.")
@click.option("--no-eval", is_flag=True, help="Skip the quality evaluation.")
@click.option("--text", type=click.Path(dir_okay=False), default=None,
              help="Text for perplexity (without it: KLD and top-1 on text the base model writes).")
@click.option("--ctx", "n_ctx", type=CTX, default=512, show_default=True,
              help="Evaluation window in tokens.")
@click.option("--chunks", "n_chunks", type=WholeNumber(1), default=16, show_default=True,
              help="Evaluation windows at most.")
@click.option("--threads", type=THREADS, default=None, help="CPU threads, at most the logical CPUs.")
@click.option("--no-store", is_flag=True, help="Do not add the result to the model store.")
@click.option("--list-supported", is_flag=True, help="List the Hugging Face architectures that convert, and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of the table.")
def convert(src: str | None, formats: str | None, tflite_kv_len: int | None, tflite_prefill: tuple[int, ...] | None,
            onnx_provider: str, profiles: tuple[str, ...], all_profiles: bool, out: str | None, outtype: str,
            quants: str | None, no_eval: bool, text: str | None, n_ctx: int, n_chunks: int,
            threads: int | None, no_store: bool, list_supported: bool, as_json: bool) -> None:
    if list_supported:
        from edge_runtime.converters.hf_to_gguf import supported_architectures

        names = supported_architectures()
        print_json(names) if as_json else click.echo("\n".join(names))
        return
    if not src:
        raise click.UsageError("missing SRC (a Hugging Face folder, a .gguf file or a model name)")
    from edge_runtime.converters.build import BuildRequest, build
    from edge_runtime.converters.build_formats import FormatOptions, default_formats, parse_formats
    from edge_runtime.planning.profiles import get_profile, load_profiles

    known = load_profiles()
    targets = tuple(known.values()) if all_profiles else tuple(get_profile(p, known) for p in profiles)
    wanted = tuple(q.strip() for q in quants.split(",") if q.strip()) if quants is not None else None
    request = BuildRequest(source=src, out=out, profiles=targets, quants=wanted, outtype=outtype,
                           evaluate=not no_eval, text=text, n_ctx=n_ctx, n_chunks=n_chunks,
                           threads=threads, add_to_store=not no_store,
                           formats=parse_formats(formats) or default_formats(targets),
                           format_options=FormatOptions(tflite_kv_len=tflite_kv_len, tflite_prefill=tflite_prefill,
                                                        onnx_provider=onnx_provider))
    with _terminate_as_interrupt(), ProgressRows() as rows:
        result = build(request, on_event=lambda event: _show_build_event(rows, event))
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        print_json({**result.manifest.to_dict(), "folder": str(result.folder), "stored_as": result.stored_as,
                    "built": list(result.built), "reused": list(result.reused), "warnings": list(result.warnings)})
        return
    click.echo(format_summary(result))


def format_summary(result: Any) -> str:
    """The table ``edgert convert`` prints: artifact, size, ppl, Δppl, KLD, top-1, profiles."""
    rows = [("artifact", "size", "ppl", "Δppl", "KLD", "top-1", "profiles")]
    notes = []
    manifest = result.manifest
    ref_sha = (manifest.evaluation or {}).get("base_sha256")
    for a in manifest.artifacts:
        q = a.quality or {}
        is_ref = a.sha256 == ref_sha if ref_sha else a.role == "base" and a.format == "gguf"
        label = f"{(a.quant or '?').lower()} (reference)" if is_ref else str(a.quant)
        if a.format != "gguf":
            label = f"{a.format} {label}"
        if a.fallbacks:
            label += "*"
            more = ", ..." if len(a.fallbacks) > 1 else ""
            n = len(a.fallbacks)
            notes.append(f"* {a.quant}: {n} tensor{'s' if n > 1 else ''} fell back to another type "
                         f"({a.fallbacks[0]}{more})")
        rows.append((
            label, f"{a.size_bytes / MB:.0f} MB",
            _num(q.get("ppl"), "{:.2f}"),
            "—" if is_ref else _num(q.get("delta_ppl_pct"), "{:+.1f}%"),
            "—" if is_ref else _num(q.get("kld_mean"), "{:.4f}"),
            "—" if is_ref else _num(None if q.get("top1_agreement") is None else 100 * q["top1_agreement"], "{:.1f}%"),
            ", ".join(a.profiles),
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.rjust(w) if i == 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False)))
             + "  " + r[-1] for r in rows]
    lines = [line.rstrip() for line in lines] + notes
    evaluation = result.manifest.evaluation
    compared = any(a.quality and a.quality.get("kld_mean") is not None for a in result.manifest.artifacts)
    if evaluation and not evaluation.get("text") and compared:
        lines.append("ppl: not measured (it needs a text: --text FILE); KLD and top-1 on text the base model wrote")
    stored = f" · added to the model store as {result.stored_as}" if result.stored_as else ""
    lines.append(f"wrote {result.manifest_path}{stored}")
    return "\n".join(lines)


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


@click.command("eval")
@click.argument("artifact", type=MODEL)
@click.option("--reference", type=MODEL, default=None,
              help="The artifact to compare with (KLD, top-1); usually the f16 base.")
@click.option("--text", type=click.Path(dir_okay=False), default=None, help="Text file for perplexity.")
@click.option("--ctx", "n_ctx", type=CTX, default=512, show_default=True,
              help="Window in tokens (llama-perplexity's -c).")
@click.option("--chunks", "n_chunks", type=WholeNumber(1), default=None,
              help="Windows at most (default: the whole text, as llama-perplexity).")
@click.option("--threads", type=THREADS, default=None, help="CPU threads, at most the logical CPUs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option("--kv-cache-types", "kv_types", is_flag=True,
              help="Also measure what a q8_0 and a q4_0 KV cache cost a GGUF (KLD, top-1 against an f16 cache).")
def eval_(artifact: str, reference: str | None, text: str | None, n_ctx: int, n_chunks: int | None,
          threads: int | None, as_json: bool, kv_types: bool) -> None:
    """Perplexity of ARTIFACT over a text, and KL divergence and top-1 agreement vs a reference."""
    from edge_runtime.converters.evaluate import evaluate, kv_type_costs
    from edge_runtime.errors import InvalidConfigError
    from edge_runtime.models.spec import resolve_model

    if text is None and reference is None:
        raise InvalidConfigError("nothing to measure: perplexity needs a text, KLD a reference",
                                 "give --text FILE, --reference MODEL, or both")
    path = resolve_model(artifact)
    ref_path = resolve_model(reference) if reference else None
    with _terminate_as_interrupt(), ProgressRows() as rows:
        rows.show("evaluating", 0, None)
        report = evaluate(path, ref_path, text=text, n_ctx=n_ctx, n_chunks=n_chunks, threads=threads,
                          progress=lambda done, total: rows.show("evaluating", done, total, f"{done}/{total} windows"))
        costs = kv_type_costs(path, text=text, n_ctx=n_ctx, n_chunks=n_chunks, threads=threads,
                              progress=lambda done, total: rows.show("KV cache types", done, total,
                                                                     f"{done}/{total} windows")) if kv_types else None
    if as_json:
        print_json({"artifact": str(path), "reference": str(ref_path) if ref_path else None,
                    "text": text, **report.to_dict(), **({"kv_cache_types": costs} if costs is not None else {})})
        return
    click.echo(format_report(report, Path(path), ref_path, text))
    for kv, cost in (costs or {}).items():
        click.echo(f"{'kv ' + kv:<10} " + (f"unsupported: {cost['unsupported']}" if "unsupported" in cost else
                                           f"KLD {cost['kld']:.6f} · top-1 {100 * cost['top1_agreement']:.2f}% "
                                           "against an f16 KV cache"))


def format_report(report: Any, path: Path, ref_path: Path | None, text: str | None) -> str:
    """``edgert eval``'s lines: what was measured on what, then the figures."""
    r = report
    on = (f"{Path(text).name} (sha256 {r.text_sha256[:12]})" if text
          else f"text the reference wrote from fixed prompts ({r.n_chunks} samples)")
    rows = [("artifact", str(path)), ("reference", str(ref_path) if ref_path else "—"),
            ("text", f"{on} · {r.n_chunks} windows of ≤{r.n_ctx} tokens · {r.n_tokens} scored")]
    if r.ppl is None:
        rows.append(("perplexity", "not available: it needs a text (--text FILE)"))
    else:
        extra = f" (reference {r.ppl_ref:.4f}, {r.delta_ppl_pct:+.2f}%)" if r.ppl_ref is not None else ""
        rows.append(("perplexity", f"{r.ppl:.4f}{extra}"))
    if r.kld_mean is not None:
        rows.append(("KLD", f"{r.kld_mean:.6f} (mean KL(reference ‖ artifact), nats)"))
        rows.append(("top-1", f"{100 * r.top1_agreement:.2f}% of positions agree"))
    return "\n".join(f"{k:<10} {v}" for k, v in rows)
