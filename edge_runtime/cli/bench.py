"""``edgert bench``, ``report`` and ``device-test``: measure this device and show what it does."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.options import CTX, MODEL, MODEL_HELP, THREADS, WORKERS, CommaList, WholeNumber
from edge_runtime.cli.output import ProgressRows
from edge_runtime.errors import EdgeRuntimeError, InvalidConfigError

MIB = 1 << 20


def _str_list(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for v in values for p in v.split(",") if p.strip())


def format_bench_table(doc: dict[str, Any]) -> str:
    """The bench result as a table for the terminal."""
    prompts = doc["method"]["prompt_tokens"]
    head = (f"{'artifact':<32} {'backend':<10} {'thr':>3} {'decode tok/s':>15} {f'pp{prompts[-1]} tok/s':>16} "
            f"{'TTFT ms ' + '/'.join(map(str, prompts)):>22} {'load s':>7} {'peak RSS':>9} {'ceiling':>8} {'eff':>5}")
    lines = [head]
    for r in doc["results"]:
        label = f"{r['artifact']['name']} {r['artifact'].get('quant') or ''}".strip()
        roof = r.get("roofline") or {}
        eff = roof.get("efficiency")
        ttft = "/".join(f"{r['ttft_ms'][str(n)]:.0f}" for n in prompts)
        rss = f"{r['peak_rss_bytes'] / MIB:.0f} MiB" if r.get("peak_rss_bytes") else "—"
        ceiling = f"{r['decode_ceiling_tok_s']:.0f}" if r.get("decode_ceiling_tok_s") else "—"
        lines.append(f"{label[:32]:<32} {r['backend']:<10} {r['threads']:>3} "
                     f"{r['decode_tok_s']:>8.1f} ± {r['decode_tok_s_sd']:<4.1f} "
                     f"{r['prefill_tok_s']:>9.1f} ± {r['prefill_tok_s_sd']:<4.1f} {ttft:>22} {r['load_s']:>7.2f} "
                     f"{rss:>9} {ceiling:>8} {'—' if eff is None else f'{eff:.0%}':>5}")
    bw = doc["memory_bandwidth"]
    first = doc["results"][0]
    energy = first.get("energy") or {}
    temp = first.get("temperature_c") or {}
    lines.append("")
    lines.append(f"read bandwidth {bw['gbs']:.1f} GB/s ({bw['threads']} threads) · "
                 f"energy: {energy.get('note') or 'see JSON'} · CPU temperature "
                 f"{temp.get('before') if temp.get('before') is not None else 'n/a'} → "
                 f"{temp.get('after') if temp.get('after') is not None else 'n/a'} °C")
    m = doc["method"]
    lines.append(f"{m['reps']} reps after {m['warmup']} warm-up · decode {m['gen_tokens']} tokens after a "
                 f"{m['decode_prompt_tokens']}-token prompt · greedy · prompt text: {m['prompt_source']}")
    for skip in doc.get("skipped") or []:
        lines.append(f"skipped {skip['artifact']} ({skip['backend']}): {skip['why']}")
    return "\n".join(lines)


@click.command()
@click.argument("artifacts", nargs=-1, type=MODEL)
@click.option("--model", "-m", type=MODEL, default=None, help=MODEL_HELP)
@click.option("--backend", "backends", multiple=True, help="Backend(s) to measure; repeat or comma-separate.")
@click.option("--threads", "threads", type=CommaList(THREADS), multiple=True,
              help="Thread count(s), at most the logical CPUs; repeat or comma-separate (e.g. 2,4).")
@click.option("--ctx", type=CTX, default=None, help="Context size (default: the plan's).")
@click.option("--prompt-tokens", type=CommaList(WholeNumber(1)), default="32,128,512", show_default=True,
              help="Prompt lengths for prefill and TTFT.")
@click.option("--gen-tokens", type=WholeNumber(2), default=128, show_default=True, help="Tokens to decode.")
@click.option("--reps", type=WholeNumber(1), default=5, show_default=True, help="Timed repetitions.")
@click.option("--warmup", type=WholeNumber(0), default=1, show_default=True, help="Discarded warm-up rounds.")
@click.option("--prompt-file", default=None, help="Text to build the prompts from (default: built-in).")
@click.option("--profile", "profile_id", default=None, help="Device profile to plan with (default: matched).")
@click.option("--bandwidth-mib", type=WholeNumber(32), default=512, show_default=True,
              help="Buffer for the memory bandwidth pass (capped at a quarter of available RAM).")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Write the result to FILE, or print it with --json alone.")
@click.option("--anatomy", is_flag=True,
              help="Also measure where one reply's time goes: storage (cold/warm load, page-in, mmap), compute "
                   "(1..N threads), transfer (in-process, HTTP, RPC) and cache (cold, restored, hot TTFT).")
@WORKERS
def bench(artifacts: tuple[str, ...], model: str | None, backends: tuple[str, ...],
          threads: tuple[tuple[int, ...], ...], ctx: int | None, prompt_tokens: tuple[int, ...], gen_tokens: int,
          reps: int, warmup: int, prompt_file: str | None, profile_id: str | None, bandwidth_mib: int,
          json_out: str | None, anatomy: bool, workers: tuple[str, ...]) -> None:
    """Measure prefill, decode, TTFT, load time, memory and the roofline of models on this device."""
    from edge_runtime.bench.runner import BenchRequest, run_bench
    from edge_runtime.files import atomic_write, write_target

    if model and artifacts:
        raise click.UsageError("give --model or ARTIFACT arguments, not both")
    if json_out and json_out != "-":
        write_target(json_out)  # refuse a device or a folder now, not after minutes of measuring
    request = BenchRequest(
        models=tuple(artifacts) or (model,), backends=_str_list(backends),
        threads=tuple(n for group in threads for n in group), ctx=ctx, prompt_tokens=prompt_tokens,
        gen_tokens=gen_tokens, reps=reps, warmup=warmup, prompt_file=prompt_file,
        bandwidth_buffer_bytes=bandwidth_mib * MIB, profile=profile_id, workers=workers, anatomy=anatomy,
    )
    with ProgressRows() as rows:
        result = run_bench(request, lambda label, done, total, step:
                           rows.show(label, done, total, f"{done}/{total} {step}"))
    doc = result.to_dict()
    text = json.dumps(doc, indent=1, allow_nan=False)
    if json_out == "-":
        click.echo(text)
        return
    if json_out:
        atomic_write(json_out, text + "\n")
    click.echo(format_bench_table(doc))
    if json_out:
        click.echo(f"wrote {json_out}", err=True)


@click.command()
@click.argument("results", nargs=-1)
@click.option("--fleet", "fleet_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="A folder of device folders, each with the bench.json of `edgert device-test` "
                   "(scripts/collect_report.sh gathers them): one report over all.")
@click.option("--out", "out_dir", default="edgert-report", show_default=True, help="Folder to write the report into.")
def report(results: tuple[str, ...], fleet_dir: str | None, out_dir: str) -> None:
    """Write report.html, report.md and report.json from bench result files (several: a fleet view)."""
    from edge_runtime.report import build_report, recommendation_line, write_report

    if fleet_dir is not None:
        fleet = Path(fleet_dir)
        found = tuple(str(p) for p in sorted(fleet.rglob("bench.json"))  # not in a half-copied .NAME.tmp
                      if not any(part.startswith(".") for part in p.relative_to(fleet).parts))
        if not found:
            raise InvalidConfigError(f"{fleet_dir} holds no bench.json",
                                     "gather the devices' device-test folders with scripts/collect_report.sh")
        results += found
    if not results:
        raise click.UsageError("give RESULT files, or --fleet FOLDER")
    built = build_report(list(results))
    written = write_report(built, out_dir)
    for run in built.runs:
        click.echo(f"{run.label}: floor {run.floor.status} ({run.floor.what}); "
                   f"recommended: {recommendation_line(run.result)}")
    for path in written:
        if path.suffix != ".png":
            click.echo(f"wrote {path}", err=True)


def device_tests_folder() -> Path:
    """Where the on-device suite lives: the installed package, else the checkout's folder."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("edge_runtime.device_tests")
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    local = Path(__file__).resolve().parent.parent / "device_tests"
    if (local / "conftest.py").is_file():
        return local
    raise EdgeRuntimeError("the device test suite is not installed with this edgert",
                           "reinstall edge-runtime (the suite ships as edge_runtime.device_tests)")


@click.command("device-test", context_settings={"ignore_unknown_options": True})
@click.option("--model", "-m", type=MODEL, default=None, help=MODEL_HELP)
@click.option("--out", "out_dir", default="edgert-device-test", show_default=True,
              help="Folder for the bench result, the report and the test log.")
@click.option("--reps", type=WholeNumber(1), default=3, show_default=True, help="Bench repetitions.")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def device_test(model: str | None, out_dir: str, reps: int, pytest_args: tuple[str, ...]) -> None:
    """Check that this device meets its profile (runs the on-device pytest suite, writes a report).

    Extra arguments go to pytest (e.g. -k floor, -x).
    """
    import importlib.util
    import subprocess

    if importlib.util.find_spec("pytest") is None:
        raise EdgeRuntimeError("edgert device-test runs its checks with pytest, which is not installed",
                               "pip install pytest")
    folder = device_tests_folder()
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", str(folder), "--rootdir", str(folder), "-p", "no:cacheprovider",
               # xunit1: the JUnit dialect that keeps each check's record_property (its figures)
               "-rs", f"--junitxml={out / 'device-tests.xml'}", "-o", "junit_family=xunit1",
               f"--edgert-out={out}", f"--edgert-reps={reps}"]
    if model:
        command.append(f"--edgert-model={model}")
    code = subprocess.call([*command, *pytest_args])
    if (out / "verdict.md").is_file():
        click.echo(f"verdict: {out / 'verdict.md'}", err=True)
    if (out / "report.html").is_file():
        click.echo(f"report: {out / 'report.html'}", err=True)
    click.echo(f"test log: {out / 'device-tests.xml'}", err=True)
    if code not in (0, 5):  # 5: nothing collected (a -k that matched no test)
        raise EdgeRuntimeError("the device does not pass every check (see the failures above)",
                               f"the report in {out} has the measurements")
    if code == 5:
        raise InvalidConfigError("no device test matched", "check the -k expression")
