"""Planning: device profiles, memory estimates, and the plan (backend, artifact, settings, reasons).

``plan()`` is the library's central act; the CLI, the bench and the on-device suite all call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.device.info import DeviceInfo
    from edge_runtime.models.artifact import Artifact
    from edge_runtime.planning.planner import Plan
    from edge_runtime.planning.profiles import DeviceProfile


def plan(
    model: str | Artifact | Sequence[Artifact] | None = None,
    *,
    backend: str | None = None,
    ctx: int | None = None,
    threads: int | None = None,
    parallel: int = 1,
    n_gpu_layers: int | None = None,
    kv_cache_type: str | None = None,
    profile: str | DeviceProfile | None = None,
    device: DeviceInfo | None = None,
    force: bool = False,
    workers: Sequence[str] = (),
) -> Plan:
    """The backend, artifact and settings this device would run ``model`` with, and why.

    ``model`` is a ``--model`` value (a file, a convert folder, a store or embedded name; None: the
    default model) or artifacts already found. ``device`` defaults to ``detect()``, ``profile``
    (an id or a profile) to the best match for the device. Raises ``DoesNotFitError`` with every
    rejected alternative when nothing fits, unless ``force`` (then the first candidate is planned
    anyway, its reasons saying by how much it misses the budget). ``workers`` (``host:port`` of
    ``edgert worker``s) are asked for their memory, and the plan puts the layers they hold there.
    """
    from edge_runtime.device.info import detect
    from edge_runtime.models.artifact import Artifact
    from edge_runtime.models.spec import find_artifacts
    from edge_runtime.planning.planner import PlanRequest, choose_plan
    from edge_runtime.planning.profiles import get_profile, match_profile

    if model is None or isinstance(model, str):
        artifacts = find_artifacts(model)
    elif isinstance(model, Artifact):
        artifacts = [model]
    else:
        artifacts = list(model)
    device = device or detect()
    if profile is None:
        profile = match_profile(device)
    elif isinstance(profile, str):
        profile = get_profile(profile)
    worker_devices: tuple = ()
    if workers:
        from edge_runtime.backends.llamacpp.rpc import parse_workers, probe_workers

        worker_devices = probe_workers(parse_workers(workers))
    request = PlanRequest(ctx=ctx, threads=threads, backend=backend, n_gpu_layers=n_gpu_layers,
                          n_parallel=parallel, kv_cache_type=kv_cache_type, force=force, workers=worker_devices)
    return choose_plan(artifacts, device, profile, request)
