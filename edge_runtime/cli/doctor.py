"""``edgert doctor``: what is installed and how it was built, what runs here, and what to run for the rest.

It reports, and never fails on what it finds missing (exit 0); it exits non-zero only when it
cannot run at all. Loading the RPC library and the embedded model happens in child processes:
the first would make this process's llama.cpp report GPU offload, and either could abort it.
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import click

from edge_runtime.cli.output import print_json

MIB = 1 << 20


def _llama_build() -> tuple[dict[str, Any] | None, str | None]:
    from edge_runtime.backends.llamacpp import build_info

    try:
        return build_info(), None
    except (ImportError, OSError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _rpc() -> dict[str, Any]:
    """The RPC library's state, and whether it really loads (in a child) when it should."""
    from edge_runtime.backends.llamacpp import rpc

    status = rpc.library_status()
    found = {**status.to_dict(), "loads": None}
    if status.available:
        failure = rpc.check_library()
        found["loads"] = failure is None
        if failure is not None:
            found.update(state="broken", reason=f"it does not load: {failure}", available=False)
    return found


def _embedded() -> dict[str, Any]:
    """The default embedded model: there, its sha256 the package's, and loading in a child."""
    from edge_runtime.backends.trial_load import trial_load
    from edge_runtime.errors import EdgeRuntimeError
    from edge_runtime.files import file_sha256
    from edge_runtime.models.embedded import embedded_model_path, find_embedded

    model = find_embedded("smollm2")
    assert model is not None
    found: dict[str, Any] = {"name": model.name, "package": model.package, "path": None,
                             "expected_sha256": model.sha256, "sha256": None, "sha256_ok": None, "loads": None,
                             "error": None}
    path = embedded_model_path(model)
    if path is None:
        found["error"] = f"the {model.package} package is not installed"
        return found
    found["path"] = str(path)
    found["sha256"] = file_sha256(path)
    found["sha256_ok"] = found["sha256"] == model.sha256
    try:
        trial_load(str(path), "llama.cpp")
        found["loads"] = True
    except EdgeRuntimeError as exc:
        found.update(loads=False, error=exc.message)
    return found


def diagnose() -> dict[str, Any]:
    """Everything ``edgert doctor`` reports, as one JSON-ready document."""
    from edge_runtime.device import detect
    from edge_runtime.device.setup_advice import install_script, setup_steps
    from edge_runtime.planning.profiles import match_profile

    device = detect()
    profile = match_profile(device)
    llama, llama_error = _llama_build()
    rpc = _rpc()
    embedded = _embedded()
    embedded_ok = bool(embedded["sha256_ok"] and embedded["loads"])
    from importlib.metadata import PackageNotFoundError, version  # 60 ms: only when doctor runs

    try:
        edgert_version = version("edge-runtime")
    except PackageNotFoundError:
        edgert_version = "unknown"
    return {
        "edgert": {"version": edgert_version, "python": platform.python_version(), "prefix": sys.prefix},
        "device": device.to_dict(),
        "profile": profile.id,
        "llama_cpp": llama or {"error": llama_error},
        "rpc": bool(rpc["available"]),
        "rpc_library": rpc,
        "backends": [{"name": b.name, "usable": b.available, "version": b.version, "devices": list(b.devices),
                      "gpu_offload": b.gpu_offload, "why": b.reason, "install_hint": b.install_hint}
                     for b in device.backends],
        "embedded_model": embedded,
        "install_script": install_script(device),
        "steps": [s.to_dict() for s in setup_steps(device, llama, rpc["state"], embedded_ok)],
    }


def _mark(ok: bool | None) -> str:
    return "ok " if ok else "-- " if ok is None else "NO "


def format_diagnosis(doc: dict[str, Any]) -> str:
    """The doctor's findings for the terminal."""
    from edge_runtime.device.describe import format_device
    from edge_runtime.device.info import DeviceInfo

    lines = [format_device(DeviceInfo.from_dict(doc["device"]), doc["profile"]), ""]
    e, llama = doc["edgert"], doc["llama_cpp"]
    lines.append(f"edgert {e['version']} · Python {e['python']} · {e['prefix']}")
    if "error" in llama:
        lines.append(f"{_mark(False)}llama.cpp: does not import ({llama['error']})")
    else:
        gpus = ", ".join(llama["gpu_backends"]) or "none"
        lines.append(f"{_mark(True)}llama.cpp (llama-cpp-python {llama['version']}): SIMD "
                     f"{' '.join(llama['cpu_features']) or 'none'} · OpenMP {'yes' if llama['openmp'] else 'no'} · "
                     f"BLAS {'yes' if llama['blas'] else 'no'} · GPU backends {gpus} · offload "
                     f"{'yes' if llama['gpu_offload'] else 'no'}")
    rpc = doc["rpc_library"]
    lines.append(f"{_mark(doc['rpc'])}RPC (a model split across devices): {rpc['state']}: {rpc['reason']}")
    for b in doc["backends"]:
        detail = f"{b['version']} · {', '.join(b['devices']) or 'CPU'}" if b["usable"] else (b["why"] or "")
        if b["usable"] and b["why"]:
            detail += f" · {b['why']}"
        lines.append(f"{_mark(b['usable'])}backend {b['name']}: {detail}")
    m = doc["embedded_model"]
    state = ("intact and loads" if m["sha256_ok"] and m["loads"] else
             m["error"] or ("its sha256 differs from the package's" if m["sha256_ok"] is False else "does not load"))
    lines.append(f"{_mark(bool(m['sha256_ok'] and m['loads']))}embedded model {m['name']}: {state}")
    lines += ["", f"install script for this device: {doc['install_script']}"]
    if doc["steps"]:
        lines.append("missing here:")
        lines += [f"  {s['what']}" + (f": run {s['command']}" if s["command"] else "") for s in doc["steps"]]
    else:
        lines.append("nothing is missing")
    return "\n".join(lines)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def doctor(as_json: bool) -> None:
    """What is installed and how it was built, what runs on this device, and what to run for the rest.

    Exits 0 whatever it finds missing.
    """
    doc = diagnose()
    if as_json:
        print_json(doc)
    else:
        click.echo(format_diagnosis(doc))
