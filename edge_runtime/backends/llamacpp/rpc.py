"""llama.cpp's RPC backend: its library, a worker serving this machine, and the workers a model uses.

llama-cpp-python's wheel leaves RPC out; ``scripts/enable_rpc.sh`` compiles it from the same
vendored sources into ``libggml-rpc.so`` beside the venv, with a stamp of the llama-cpp-python
version and the ``libggml-base`` it was linked against. ``library_status`` reads that without
loading anything. Loading the library registers an "RPC" backend, after which llama.cpp counts
every attached worker as a GPU (and reports GPU offload), so only processes that use RPC load it:
a worker (``serve_worker``), the child that hosts a split model (``remote_host``), and the short
children ``probe_workers`` and ``check_library`` start.

A worker that cannot be reached, or dies while a model uses it, makes ggml abort the whole
process: no error code comes back. Hence those children, and a plain TCP connect to every worker
before llama.cpp is let near it. ggml's symbols are always taken through llama_cpp's own library
handle: the wheel ships each ggml library as several separate copies, and loading one by path
would map a second registry that llama.cpp never reads.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_runtime.errors import BackendUnavailableError, InvalidConfigError, WorkerUnavailableError
from edge_runtime.files import file_sha256

LIBRARY_ENV = "EDGERT_GGML_RPC"  # a library path that overrides the one beside the venv
ENABLE_HINT = "run scripts/enable_rpc.sh (it builds llama.cpp's RPC backend for this venv)"
DEFAULT_PORT = 50052  # llama.cpp's rpc-server's
CONNECT_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 30.0  # a worker busy with another client makes the probe wait: then it says so
# Set in every process that loads the library: ggml's abort then skips running gdb (seconds).
ABORT_ENV = {"GGML_NO_BACKTRACE": "1"}
DEVICE_CPU = 0  # enum ggml_backend_dev_type
_ENDPOINT = re.compile(r"^(?P<host>[A-Za-z0-9.-]+):(?P<port>\d{1,5})$")
_ABORT_LINE = re.compile(r"ggml-rpc\.cpp:\d+: (.+)")


@dataclass(frozen=True)
class RpcLibrary:
    """Whether llama.cpp's RPC backend can be loaded here, found without loading it."""

    state: str  # "built-in", "installed", "missing", "stale", "unsupported"
    path: str | None
    reason: str
    llama_cpp_version: str | None = None
    base_library: str | None = None  # the libggml-base it must be linked against
    base_sha256: str | None = None

    @property
    def available(self) -> bool:
        return self.state in ("built-in", "installed")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "available": self.available}


@dataclass(frozen=True)
class WorkerDevice:
    """One device a worker serves, and its memory as the worker reports it."""

    endpoint: str
    name: str  # llama.cpp's name in this process: RPC0, RPC1, ...
    free_bytes: int
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_workers(text: str | Sequence[str]) -> tuple[str, ...]:
    """``host:port`` endpoints from a comma list (or several); a malformed one is a user error."""
    items = [text] if isinstance(text, str) else list(text)
    found: list[str] = []
    for part in (p.strip() for item in items for p in item.split(",")):
        if not part:
            continue
        match = _ENDPOINT.match(part)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise InvalidConfigError(f"{part!r} is not a worker address",
                                     "write HOST:PORT, e.g. 192.168.1.20:50052; IPv6 literals are not supported")
        if part in found:
            raise InvalidConfigError(f"the worker {part} is named twice", "name each worker once")
        found.append(part)
    return tuple(found)


# -- the library, found without loading it ------------------------------------------------------------

def library_path() -> Path:
    """Where ``scripts/enable_rpc.sh`` installs the library (``EDGERT_GGML_RPC`` overrides it)."""
    override = os.environ.get(LIBRARY_ENV)
    return Path(override) if override else Path(sys.prefix) / "share" / "edge-runtime" / "ggml-rpc" / "libggml-rpc.so"


def _llama_lib_folder() -> Path | None:
    spec = importlib.util.find_spec("llama_cpp")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def library_status() -> RpcLibrary:
    """Is the RPC backend built into llama-cpp-python, installed beside it and current, or not?"""
    folder = _llama_lib_folder()
    target = library_path()
    if folder is None:
        return RpcLibrary("missing", str(target), "llama-cpp-python is not installed")
    version = importlib.metadata.version("llama-cpp-python")
    built_in = sorted(folder.glob("libggml-rpc.*"))
    if built_in:
        return RpcLibrary("built-in", str(built_in[0]), "llama-cpp-python was built with GGML_RPC", version)
    base = next((folder / n for n in ("libggml-base.so.0", "libggml-base.so") if (folder / n).is_file()), None)
    if base is None:
        return RpcLibrary("unsupported", str(target), f"no libggml-base.so in {folder} (enable_rpc.sh builds "
                          "for Linux only)", version)
    sha = file_sha256(base)
    found = RpcLibrary("missing", str(target), f"{target} is not there", version, str(base), sha)
    if not target.is_file():
        return found
    try:
        stamp = json.loads(target.with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return RpcLibrary("stale", str(target), "its stamp (libggml-rpc.json) is missing or unreadable", version,
                          str(base), sha)
    if not isinstance(stamp, dict) or stamp.get("llama_cpp_python") != version or stamp.get(
            "libggml_base_sha256") != sha:
        built_for = stamp.get("llama_cpp_python") if isinstance(stamp, dict) else None
        return RpcLibrary("stale", str(target), f"built for llama-cpp-python {built_for}, this is {version} "
                          "(or another build of it)", version, str(base), sha)
    return RpcLibrary("installed", str(target), "built by scripts/enable_rpc.sh for this llama-cpp-python",
                      version, str(base), sha)


def require_library() -> RpcLibrary:
    """The library's status; raises ``BackendUnavailableError`` with the fix when it cannot load."""
    status = library_status()
    if not status.available:
        raise BackendUnavailableError(f"llama.cpp's RPC backend is not available: {status.reason}", ENABLE_HINT)
    return status


# -- ggml's registry through llama_cpp's own handle (processes that use RPC only) -----------------

class _Ggml:
    """ggml's backend registry and the RPC entry points, bound once per process."""

    def __init__(self, library: str | None) -> None:
        import llama_cpp

        # Harmless if native.ensure_initialized() ran already (a model host routes the log first).
        llama_cpp.llama_backend_init()
        lib = llama_cpp.llama_cpp._lib  # dlsym here reaches the libggml copies libllama uses
        c_void_p, c_size_t, c_char_p = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p

        def bind(name: str, argtypes: list[Any], restype: Any) -> Any:
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
            return function

        self.load = bind("ggml_backend_load", [c_char_p], c_void_p)
        self.register = bind("ggml_backend_register", [c_void_p], None)
        self.reg_by_name = bind("ggml_backend_reg_by_name", [c_char_p], c_void_p)
        self.proc_address = bind("ggml_backend_reg_get_proc_address", [c_void_p, c_char_p], c_void_p)
        self.reg_dev_count = bind("ggml_backend_reg_dev_count", [c_void_p], c_size_t)
        self.reg_dev_get = bind("ggml_backend_reg_dev_get", [c_void_p, c_size_t], c_void_p)
        self.dev_by_type = bind("ggml_backend_dev_by_type", [ctypes.c_int], c_void_p)
        self.dev_name = bind("ggml_backend_dev_name", [c_void_p], c_char_p)
        self.dev_memory = bind("ggml_backend_dev_memory",
                               [c_void_p, ctypes.POINTER(c_size_t), ctypes.POINTER(c_size_t)], None)
        reg = self.reg_by_name(b"RPC")  # a wheel built with GGML_RPC has it already
        if not reg:
            if library is None:
                raise BackendUnavailableError("llama.cpp's RPC backend is not available", ENABLE_HINT)
            reg = self.load(library.encode())  # dlopen, ggml_backend_init, register
            if not reg:
                raise BackendUnavailableError(f"{library} does not load into this llama-cpp-python",
                                              f"rebuild it: scripts/enable_rpc.sh --force ({ENABLE_HINT})")
        add = self.proc_address(reg, b"ggml_backend_rpc_add_server")
        start = self.proc_address(reg, b"ggml_backend_rpc_start_server")
        if not add or not start:
            raise BackendUnavailableError("the RPC backend lacks its server functions", ENABLE_HINT)
        self.add_server = ctypes.CFUNCTYPE(c_void_p, c_char_p)(add)
        self.start_server = ctypes.CFUNCTYPE(None, c_char_p, c_char_p, c_size_t, c_size_t,
                                             ctypes.POINTER(c_void_p))(start)
        self.attached: dict[str, list[int]] = {}

    def memory(self, device: int) -> tuple[int, int]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.dev_memory(device, ctypes.byref(free), ctypes.byref(total))
        return int(free.value), int(total.value)


_ggml: _Ggml | None = None
_ggml_lock = threading.Lock()


def load_library(library: str | None = None) -> _Ggml:
    """Load the RPC backend into llama.cpp's registry (once per process) and bind its functions.

    ``library`` names a file to load (enable_rpc.sh's check of a fresh build); by default the
    installed one, or none when llama-cpp-python has RPC built in.
    """
    global _ggml
    with _ggml_lock:
        if _ggml is None:
            if library is None:
                status = require_library()
                library = status.path if status.state == "installed" else None
            _ggml = _Ggml(library)
        return _ggml


def check_reachable(endpoint: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A plain TCP connect to a worker, so "nothing listens there" is an error, not ggml's abort."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise WorkerUnavailableError(f"the worker {endpoint} does not answer ({why})",
                                     f"start it there with `edgert worker --port {port}`, or check the address") \
            from None


def attach(endpoints: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Connect to each worker and register its devices in this process's llama.cpp (once each).

    After this, every model this process loads may offload to them: call it only in a process
    that hosts a split model or probes workers.
    """
    for endpoint in endpoints:
        check_reachable(endpoint)
    api = load_library()
    found = []
    for endpoint in endpoints:
        if endpoint not in api.attached:
            reg = api.add_server(endpoint.encode())  # aborts the process if the worker vanished since
            if not reg:
                raise WorkerUnavailableError(f"the worker {endpoint} reports no devices")
            api.register(reg)
            api.attached[endpoint] = [api.reg_dev_get(reg, i) for i in range(api.reg_dev_count(reg))]
        found.append((endpoint, api.attached[endpoint]))
    return found


def place_on_workers(params: Any, rpc_servers: Sequence[str], tensor_split: Sequence[float]) -> tuple[Any, ...]:
    """Point ``llama_model_params`` at exactly the workers' devices, in order, split as planned.

    Returns the ctypes arrays the params point into; the caller keeps them until the load is done.
    """
    import llama_cpp

    devices = [device for _, found in attach(rpc_servers) for device in found]
    device_list = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)  # NULL-terminated
    params.devices = ctypes.cast(device_list, ctypes.c_void_p)
    split = None
    if tensor_split:
        # llama.cpp reads llama_max_devices() floats, indexed like the device list.
        split = (ctypes.c_float * llama_cpp.llama_max_devices())(*tensor_split[: llama_cpp.llama_max_devices()])
        params.tensor_split = split
    return device_list, split


def worker_devices(endpoints: Sequence[str]) -> list[WorkerDevice]:
    """Each worker's devices and their free and total memory (in this process: see ``probe_workers``)."""
    api = load_library()
    found = []
    for endpoint, devices in attach(endpoints):
        for device in devices:
            free, total = api.memory(device)
            found.append(WorkerDevice(endpoint, api.dev_name(device).decode(), free, total))
    return found


def serve_worker(host: str, port: int, threads: int) -> None:
    """Serve this machine's CPU to llama.cpp clients, one at a time, until the process is stopped."""
    import signal

    endpoint = f"{host}:{port}"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # a clear error for a taken port
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise WorkerUnavailableError(f"cannot listen on {endpoint}: {exc.strerror}",
                                         "pick another --port, or stop what uses it") from None
    api = load_library()
    cpu = api.dev_by_type(DEVICE_CPU)
    # The accept loop never returns to Python, so Python's Ctrl-C handler would never run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    api.start_server(endpoint.encode(), None, threads, 1, (ctypes.c_void_p * 1)(cpu))
    raise WorkerUnavailableError(f"llama.cpp's RPC server stopped at once on {endpoint}",
                                 "check the address; another process may have taken the port")


# -- children that load the library so the caller never does ------------------------------------

def abort_reason(stderr: str) -> str | None:
    """What ggml's RPC client said before it aborted its process, if it did."""
    found = _ABORT_LINE.findall(stderr)
    return found[-1].strip() if found else None


def _run_child(args: list[str], timeout: float) -> tuple[dict[str, Any] | None, str, int]:
    """``python -m edge_runtime.backends.llamacpp.rpc ARGS``: its last JSON line, stderr, exit code."""
    command = [sys.executable, "-m", "edge_runtime.backends.llamacpp.rpc", *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ABORT_ENV},
                          stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), proc.stderr, proc.returncode


def probe_workers(endpoints: Sequence[str], timeout: float = PROBE_TIMEOUT_S) -> tuple[WorkerDevice, ...]:
    """Each worker's devices and memory, asked from a child process (this one never loads RPC)."""
    require_library()
    for endpoint in endpoints:
        check_reachable(endpoint)
    try:
        report, stderr, code = _run_child(["probe", *endpoints], timeout)
    except subprocess.TimeoutExpired:
        raise WorkerUnavailableError(f"the workers {', '.join(endpoints)} did not answer within {timeout:.0f} s",
                                     "a worker serves one client at a time: is another model using it?") from None
    if report is None or not report.get("ok"):
        why = (report or {}).get("message") or abort_reason(stderr) or f"exit code {code}"
        raise WorkerUnavailableError(f"could not ask the workers for their memory: {why}",
                                     (report or {}).get("hint") or "check that each address runs `edgert worker`")
    return tuple(WorkerDevice(**d) for d in report["devices"])


def check_library() -> str | None:
    """Load the library in a child (this process stays free of it): None when it loads, else why."""
    status = library_status()
    if not status.available:
        return status.reason
    try:
        report, stderr, code = _run_child(["check"], 60.0)
    except subprocess.TimeoutExpired:
        return "loading it did not finish within 60 s"
    if report is None or not report.get("ok"):
        return (report or {}).get("message") or abort_reason(stderr) or f"the check exited with code {code}"
    return None


def _main(argv: list[str]) -> int:
    """``facts`` (for enable_rpc.sh: five lines), ``check [--library PATH]``, ``probe ENDPOINT...``."""
    from edge_runtime.errors import EdgeRuntimeError

    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "facts":
        status = library_status()
        print(status.state, status.llama_cpp_version, status.base_library, status.base_sha256, library_path(),
              status.reason, sep="\n")
        return 0
    try:
        if command == "check":
            load_library(rest[1] if rest[:1] == ["--library"] and len(rest) > 1 else None)
            report: dict[str, Any] = {"ok": True}
        elif command == "probe":
            report = {"ok": True, "devices": [d.to_dict() for d in worker_devices(rest)]}
        else:
            print(f"usage: python -m {__spec__.name if __spec__ else 'rpc'} facts|check|probe", file=sys.stderr)
            return 2
    except EdgeRuntimeError as exc:
        report = {"ok": False, "message": exc.message, "hint": exc.hint}
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
