"""``edgert convert --format gguf,tflite,onnx``: one build writes all three, reuses them, and each runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.manifest import read_manifest, verify_manifest

MISSING = [m for m in ("litert_torch", "ai_edge_litert", "onnxruntime_genai", "onnx")
           if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(f"{', '.join(MISSING)} not installed: pip install \"edge-runtime[tflite,onnx,convert]\"",
                allow_module_level=True)

ARGS = ["--format", "gguf,tflite,onnx", "--quant", "Q8_0,int8", "--no-eval", "--no-store", "--threads", "2",
        "--tflite-kv-len", "64", "--tflite-prefill", "8,32", "--json"]


def _convert(src: Path, out: Path) -> dict:
    from edge_runtime.cli import cli
    from edge_runtime.cli_convert import convert

    if "convert" not in cli.commands:
        cli.add_command(convert)
    res = CliRunner().invoke(cli, ["convert", str(src), "--out", str(out), *ARGS])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def three_formats(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("formats") / "tiny"
    return out, _convert(tiny_llama_dir, out)


def test_one_build_writes_all_three_formats(three_formats):
    out, doc = three_formats
    got = {(a["format"], a["quant"]) for a in doc["artifacts"]}
    assert {("gguf", "F16"), ("gguf", "Q8_0"), ("tflite", "int8"), ("onnx", "int8")} <= got
    assert len(got) == 4
    manifest = read_manifest(out)
    assert all(c.ok for c in verify_manifest(manifest))
    onnx = next(a for a in manifest.artifacts if a.format == "onnx")
    assert (out / onnx.file).is_dir() and onnx.file.endswith("-int8-onnx")
    tfl = next(a for a in manifest.artifacts if a.format == "tflite")
    assert tfl.file.endswith("-int8.tflite") and tfl.n_ctx_train == 64
    assert tfl.build["recipe"] == "dynamic_int8" and tfl.quality is None
    assert (out / (tfl.file + ".json")).is_file() and (out / "tokenizer.json").is_file()


def test_a_second_run_rebuilds_nothing(three_formats):
    out, first = three_formats
    again = _convert(Path(first["source"]["path"]), out)
    assert again["built"] == [] and sorted(again["reused"]) == sorted(first["built"])


@pytest.mark.parametrize("backend", [None, "tflite", "onnx"])
def test_each_backend_runs_from_the_folder(three_formats, backend, edgert_cmd):
    out, _ = three_formats
    cmd = [*edgert_cmd, "run", "Once upon a time", "--model", str(out), "--max-tokens", "4", "--temp", "0",
           "--threads", "2", "--json"]
    if backend:
        cmd += ["--backend", backend]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "text" in json.loads(res.stdout)


def test_the_store_keeps_what_tflite_and_onnx_need(three_formats, edgert_cmd):
    from edge_runtime.store import add_model, find_artifacts, store_root

    out, _ = three_formats
    stored = add_model(out, name="tiny-three-formats")
    folder = store_root() / "tiny-three-formats"
    tfl = next(a for a in stored.artifacts if a.format == "tflite")
    assert (folder / "tokenizer.json").is_file() and (folder / (tfl.file + ".json")).is_file()
    assert {a.format for a in find_artifacts("tiny-three-formats")} == {"gguf", "tflite", "onnx"}
    for backend in ("tflite", "onnx"):
        res = subprocess.run([*edgert_cmd, "run", "Hello", "--model", "tiny-three-formats", "--backend", backend,
                              "--max-tokens", "3", "--temp", "0", "--threads", "2"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
