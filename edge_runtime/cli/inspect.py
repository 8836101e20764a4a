"""``edgert device``, ``profiles``, ``plan`` and ``models``: look at the machine and the models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_runtime.cli.options import CTX, KV_CACHE_TYPE, MODEL, MODEL_HELP, THREADS, WORKERS
from edge_runtime.cli.output import print_json

MIB = 1 << 20


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def device(as_json: bool) -> None:
    """What this machine is: CPU, SIMD, memory, GPU, board, thermal, backends, profile."""
    from edge_runtime.device import detect
    from edge_runtime.device.describe import format_device
    from edge_runtime.planning.profiles import match_profile

    info = detect()
    profile = match_profile(info)
    if as_json:
        print_json({**info.to_dict(), "profile": profile.id})
    else:
        click.echo(format_device(info, profile.id))


@click.group()
def profiles() -> None:
    """Device profiles: list them, show one, or see which matches this machine."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def profiles_list(as_json: bool) -> None:
    """Every known profile; * marks this machine's."""
    from edge_runtime.device import detect
    from edge_runtime.planning.profiles import format_profile_table, load_profiles, match_profile

    found = load_profiles()
    current = match_profile(detect(probe_backends=False), found).id
    if as_json:
        print_json({"current": current, "profiles": [p.to_dict() for p in found.values()]})
    else:
        click.echo(format_profile_table(found, current))


@profiles.command("show")
@click.argument("profile_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def profiles_show(profile_id: str, as_json: bool) -> None:
    """Every setting of one profile."""
    from edge_runtime.planning.profiles import format_profile, get_profile

    profile = get_profile(profile_id)
    if as_json:
        print_json(profile.to_dict())
    else:
        click.echo(format_profile(profile))


@profiles.command("match")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def profiles_match(as_json: bool) -> None:
    """Which profile this machine matches, and why the others do not."""
    from edge_runtime.device import detect
    from edge_runtime.planning.profiles import format_match, rank_profiles

    ranked = rank_profiles(detect(probe_backends=False))
    if as_json:
        print_json([{"profile": m.profile.id, "matched": m.matched, "reasons": list(m.reasons)} for m in ranked])
    else:
        click.echo(format_match(ranked))


@click.command()
@click.option("--model", "-m", type=MODEL, default=None, help=MODEL_HELP)
@click.option("--profile", "profile_id", default=None, help="Plan for this profile instead of the matched one.")
@click.option("--backend", default=None, help="Force a backend (llama.cpp, onnx, tflite).")
@click.option("--ctx", type=CTX, default=None, help="Context size to plan for.")
@click.option("--threads", type=THREADS, default=None, help="CPU threads, at most the logical CPUs.")
@KV_CACHE_TYPE
@WORKERS
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def plan(profile_id: str | None, as_json: bool, **opts: Any) -> None:
    """Which backend, artifact and settings this device would run, and why."""
    from edge_runtime.cli.options import plan_from_options

    chosen = plan_from_options(opts, profile_id)
    if as_json:
        print_json(chosen.to_dict())
        return
    s, m, a = chosen.settings, chosen.memory, chosen.artifact
    settings = f"threads {s.n_threads} · ctx {s.n_ctx}"
    if chosen.backend == "llama.cpp":  # the other runtimes have no such knobs
        settings += (f" · batch {s.n_batch} · gpu layers {s.n_gpu_layers} · kv {s.type_k} · flash attn "
                     f"{'on' if s.flash_attn else 'off'} · mmap {'on' if s.use_mmap else 'off'}")
    rows = [
        ("backend", f"{chosen.backend}        artifact  {a.label} ({a.size_bytes / MIB:.0f} MiB)"),
        ("settings", settings),
        ("memory", f"est. {m.total_bytes / MIB:.0f} MiB of {chosen.budget_bytes / MIB:.0f} MiB budget "
                   f"(weights {m.weights_bytes / MIB:.0f} · KV {m.kv_bytes / MIB:.0f} · compute "
                   f"{m.compute_bytes / MIB:.0f} · overhead {m.overhead_bytes / MIB:.0f})"
                   + (f" · VRAM {m.vram_bytes / MIB:.0f} MiB" if m.vram_bytes else "")),
        ("profile", chosen.profile),
    ]
    rows += [("workers" if i == 0 else "", f"{w.endpoint} ({w.device}): {w.layers} layers · "
               f"{w.usable_bytes / MIB:.0f} MiB usable of {w.total_bytes / MIB:.0f} MiB")
             for i, w in enumerate(chosen.workers)]
    rows += [("why" if i == 0 else "", reason) for i, reason in enumerate(chosen.reasons)]
    rows += [("rejected" if i == 0 else "", f"{r.artifact or r.backend} ({r.backend}): {r.why}")
             for i, r in enumerate(chosen.rejected)] or [("rejected", "—")]
    click.echo("\n".join(f"{label:<9} {value}" for label, value in rows))


@click.group()
def models() -> None:
    """The models this runtime knows by name: embedded ones and the model store."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def models_list(as_json: bool) -> None:
    """Embedded and stored models with size, quant, arch, context and sha256."""
    from edge_runtime.models.store import list_models

    entries = list_models()
    if as_json:
        print_json([e.to_dict() for e in entries])
        return
    rows = [("NAME", "QUANT", "ARCH", "PARAMS", "CTX", "SIZE", "SHA256", "PATH")]
    for e in entries:
        if e.error is not None:
            rows.append((e.name, "-", "-", "-", "-", "-", "-", f"damaged: {e.error}"))
            continue
        if e.status == "joined on first use":
            rows.append((e.name, "?", "?", "?", "?", f"{(e.size_bytes or 0) / MIB:.0f} MiB", (e.sha256 or "")[:12],
                         "installed in parts, joined into the store when first loaded"))
            continue
        if e.path is None:
            rows.append((e.name, "-", "-", "-", "-", "-", "-", "not installed: " + e.description))
            continue
        rows.append((e.name, e.quant or "?", e.arch or "?", f"{(e.n_params or 0) / 1e6:.0f}M",
                     str(e.n_ctx_train or "?"), f"{(e.size_bytes or 0) / MIB:.0f} MiB",
                     (e.sha256 or "")[:12], str(e.path)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])


@models.command("add")
@click.argument("src", type=click.Path(exists=True))
@click.option("--name", default=None, help="Store name (default: from the manifest or the file name).")
@click.option("--copy", "force_copy", is_flag=True, help="Copy the files even where a hard link would do.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored manifest as JSON.")
def models_add(src: str, name: str | None, force_copy: bool, as_json: bool) -> None:
    """Add a .gguf file or a folder written by `edgert convert` to the store (checked by sha256)."""
    from edge_runtime.models.store import add_model

    manifest = add_model(src, name=name, link=not force_copy)
    if as_json:
        print_json({**manifest.to_dict(), "folder": str(manifest.folder)})
        return
    size = sum(a.size_bytes for a in manifest.artifacts)
    quants = ", ".join(a.quant or "?" for a in manifest.artifacts)
    click.echo(f"added {manifest.model} ({quants}; {size / MIB:.0f} MiB) to {manifest.folder}")


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def models_show(name: str, as_json: bool) -> None:
    """Everything the manifest of a stored model (or a convert folder) records."""
    from edge_runtime.models.embedded import find_embedded
    from edge_runtime.models.manifest import read_manifest
    from edge_runtime.models.store import list_models, open_model

    if find_embedded(name) is not None:
        entry = next(e for e in list_models(with_sha256=True) if e.name == name)
        print_json(entry.to_dict()) if as_json else click.echo(
            "\n".join(f"{k:<12} {v}" for k, v in entry.to_dict().items()))
        return
    manifest = read_manifest(name) if Path(name).is_dir() else open_model(name)
    if as_json:
        print_json({**manifest.to_dict(), "folder": str(manifest.folder)})
        return
    click.echo(format_manifest(manifest))


def format_manifest(m: Any) -> str:
    """A manifest as a few lines and a table of artifacts."""
    src = m.source
    lines = [f"model      {m.model}" + ("" if m.complete else "  (incomplete: the build did not finish)"),
             f"folder     {m.folder}",
             f"source     {src.get('name') or src.get('path')} ({src.get('kind', '?')}, {src.get('type') or '?'}"
             + (", quantized" if src.get("quantized") else "") + f", sha256 {str(src.get('sha256'))[:12]})",
             "tools      " + " · ".join(f"{k} {v}" for k, v in m.tools.items() if v)]
    rows = [("FILE", "QUANT", "SIZE", "PPL", "KLD", "TOP-1", "SHA256", "PROFILES")]
    for a in m.artifacts:
        q = a.quality or {}
        rows.append((a.file, a.quant or "?", f"{a.size_bytes / MIB:.0f} MiB",
                     "-" if q.get("ppl") is None else f"{q['ppl']:.2f}",
                     "-" if q.get("kld_mean") is None else f"{q['kld_mean']:.4f}",
                     "-" if q.get("top1_agreement") is None else f"{100 * q['top1_agreement']:.1f}%",
                     a.sha256[:12], ", ".join(a.profiles) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    for p in (m.reference or {}).get("prompts", []):
        lines.append(f"reference  {p['prompt']!r} → {p['continuation'][:60]!r}")
    return "\n".join(lines)


@models.command("verify")
@click.argument("names", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.pass_context
def models_verify(ctx: click.Context, names: tuple[str, ...], as_json: bool) -> None:
    """Re-hash stored models (all, or NAMES; a convert folder too); exit 1 on any mismatch."""
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.models.store import store_names, verify_model

    results = []
    for name in names or store_names():
        try:
            _, checks = verify_model(name)
            results.append({"name": name, "ok": all(c.ok for c in checks), "error": None,
                            "files": [c.to_dict() for c in checks]})
        except EdgeRuntimeError as exc:
            results.append({"name": name, "ok": False, "error": exc.message, "files": []})
    failed = any(not r["ok"] for r in results)
    if as_json:
        print_json({"ok": not failed, "models": results})
    else:
        if not results:
            click.echo("the store is empty; nothing to verify")
        for r in results:
            if r["error"]:
                click.echo(f"DAMAGED   {r['name']}: {r['error']}")
            for f in r["files"]:
                detail = "" if f["status"] == "ok" else f" (expected {f['expected']}, found {f['actual'] or 'nothing'})"
                click.echo(f"{f['status'].upper():<9} {r['name']}/{f['file']}{detail}")
    if failed:
        click.echo("error: some artifacts do not match their manifest", err=True)
        click.echo("hint: rebuild them with `edgert convert`, or remove them with `edgert models rm`", err=True)
        ctx.exit(1)


@models.command("rm")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def models_rm(name: str, as_json: bool) -> None:
    """Remove a model from the store (its files and manifest)."""
    from edge_runtime.models.store import remove_model

    folder = remove_model(name)
    if as_json:
        print_json({"removed": name, "folder": str(folder)})
    else:
        click.echo(f"removed {name} ({folder})")
