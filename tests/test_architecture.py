"""The house rules ARCHITECTURE.md states, checked: layers and no cycles (import-linter), the
converters' own rule (which import-linter cannot follow through the package-dir mapping), lint,
and file sizes."""

from __future__ import annotations

import ast
import graphlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "edge_runtime"
CONVERTERS = REPO / "converters"
MAX_LINES = 420  # "about 400": a file past this is asking to be split along a seam it already has

# What converters may import of the runtime: file formats, models, the foundation and the
# backends' public API (the registry, the protocols, each backend package's own __init__).
CONVERTER_ALLOWED = ("edge_runtime.formats", "edge_runtime.models", "edge_runtime.errors", "edge_runtime.files",
                     "edge_runtime.quiet", "edge_runtime.sample_text", "edge_runtime.converters")
BACKEND_PUBLIC = {"edge_runtime.backends", "edge_runtime.backends.base", "edge_runtime.backends.llamacpp",
                  "edge_runtime.backends.onnx", "edge_runtime.backends.tflite"}


def _tool(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    path = str(found) if found.exists() else shutil.which(name)
    assert path, f"{name} is not installed (it comes with the dev extra)"
    return path


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in ``path``, inside functions too, except those
    under ``if TYPE_CHECKING:`` (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(sub) for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.append((node.lineno, base))
            # `from package import submodule` imports the submodule too (a name is not a module)
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                      if _is_module(f"{base}.{alias.name}")]
    return found


def _is_module(name: str) -> bool:
    if name.startswith("edge_runtime.converters"):
        folder, parts = CONVERTERS, name.split(".")[2:]
    elif name.startswith("edge_runtime."):
        folder, parts = PACKAGE, name.split(".")[1:]
    else:
        return False
    path = folder.joinpath(*parts) if parts else folder
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _converter_modules() -> dict[str, Path]:
    out = {}
    for path in sorted(CONVERTERS.rglob("*.py")):
        rel = path.relative_to(CONVERTERS).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["edge_runtime.converters", *parts])] = path
    return out


def test_import_linter_contracts_hold():
    """Each part imports only the parts below it, and nothing imports in a circle (lazily included)."""
    proc = subprocess.run([_tool("lint-imports")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_converters_import_only_formats_models_and_the_backends_public_api():
    modules = _converter_modules()
    wrong = []
    for module, path in modules.items():
        for line, imported in _imports(path, module):
            if not imported.startswith("edge_runtime"):
                continue
            if imported in modules or imported.startswith(CONVERTER_ALLOWED) or imported in BACKEND_PUBLIC:
                continue
            wrong.append(f"{path.relative_to(REPO)}:{line} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_converters_import_nothing_in_a_circle():
    modules = _converter_modules()
    graph = {m: {i for _, i in _imports(p, m) if i in modules and i != m} for m, p in modules.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        pytest.fail(f"converters import in a circle: {' -> '.join(exc.args[1])}")


def test_only_the_cli_imports_the_converters():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli":
            continue
        module = ".".join(["edge_runtime", *[p for p in rel.with_suffix("").parts if p != "__init__"]])
        offenders += [f"{rel}:{line}" for line, imported in _imports(path, module)
                      if imported.startswith("edge_runtime.converters")]
    assert not offenders, offenders


def test_no_file_is_much_over_400_lines():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    sizes = {f: sum(1 for _ in (REPO / f).open(encoding="utf-8")) for f in tracked if (REPO / f).is_file()}
    assert not {f: n for f, n in sizes.items() if n > MAX_LINES}
