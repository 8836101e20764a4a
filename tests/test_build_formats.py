"""``edgert convert --format gguf,tflite,onnx``: one build writes all three, reuses them, and each runs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.models.manifest import read_manifest, verify_manifest

MISSING = [m for m in ("litert_torch", "ai_edge_litert", "onnxruntime_genai", "onnx")
           if importlib.util.find_spec(m) is None]
if MISSING:
    pytest.skip(f"{', '.join(MISSING)} not installed: pip install \"edge-runtime[tflite,onnx,convert]\"",
                allow_module_level=True)

# f32 bases in every format (the quality reference is the GGUF F32), int8 in each, evaluated.
ARGS = ["--format", "gguf,tflite,onnx", "--outtype", "f32", "--quant", "Q8_0,int8", "--no-store", "--threads", "2",
        "--tflite-kv-len", "64", "--tflite-prefill", "8,32", "--chunks", "4", "--json"]


def _convert(src: Path, out: Path, text: Path) -> dict:
    from edge_runtime.cli import cli
    from edge_runtime.cli.convert import convert

    if "convert" not in cli.commands:
        cli.add_command(convert)
    res = CliRunner().invoke(cli, ["convert", str(src), "--out", str(out), "--text", str(text), *ARGS])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def three_formats(tiny_llama_dir: Path, prose_file: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("formats") / "tiny"
    return out, _convert(tiny_llama_dir, out, prose_file), prose_file


def test_one_build_writes_all_three_formats(three_formats):
    out, doc, _ = three_formats
    got = {(a["format"], a["quant"]) for a in doc["artifacts"]}
    assert got == {("gguf", "F32"), ("gguf", "Q8_0"), ("tflite", "f32"), ("tflite", "int8"),
                   ("onnx", "fp32"), ("onnx", "int8")}
    manifest = read_manifest(out)
    assert all(c.ok for c in verify_manifest(manifest))
    onnx = next(a for a in manifest.artifacts if a.format == "onnx" and a.quant == "int8")
    assert (out / onnx.file).is_dir() and onnx.file.endswith("-int8-onnx")
    tfl = next(a for a in manifest.artifacts if a.format == "tflite" and a.quant == "int8")
    assert tfl.file.endswith("-int8.tflite") and tfl.n_ctx_train == 64
    assert tfl.build["recipe"] == "dynamic_int8"
    assert (out / (tfl.file + ".json")).is_file() and (out / "tokenizer.json").is_file()


def test_every_format_is_scored_against_the_gguf_reference(three_formats):
    out, doc, _ = three_formats
    manifest = read_manifest(out)
    assert manifest.evaluation["base_sha256"] == manifest.find(next(
        a.file for a in manifest.artifacts if a.format == "gguf" and a.quant == "F32")).sha256
    # The TFLite cache holds 64 positions: every format is scored on 64-token windows, and says so.
    assert manifest.evaluation["n_ctx"] == 64
    assert any("64-token windows" in w for w in doc["warnings"])
    quality = {(a.format, a.quant): a.quality for a in manifest.artifacts}
    assert all(q and q["n_tokens"] == 4 * 31 and q["ppl"] > 1 for q in quality.values()), quality
    # The same f32 weights through LiteRT and onnxruntime: the same distributions as llama.cpp's,
    # on the same token ids (a misaligned row or a shifted position would be far off).
    for key in (("tflite", "f32"), ("onnx", "fp32")):
        assert quality[key]["kld_mean"] < 1e-4 and quality[key]["top1_agreement"] > 0.99, (key, quality[key])
        assert abs(quality[key]["delta_ppl_pct"]) < 0.1
    for key in (("gguf", "Q8_0"), ("tflite", "int8"), ("onnx", "int8")):
        assert 0 < quality[key]["kld_mean"] < 0.05, (key, quality[key])


def test_a_second_run_rebuilds_nothing(three_formats):
    out, first, text = three_formats
    again = _convert(Path(first["source"]["path"]), out, text)
    assert again["built"] == [] and sorted(again["reused"]) == sorted(first["built"])
    assert [a["quality"] for a in again["artifacts"]] == [a["quality"] for a in first["artifacts"]]


@pytest.mark.parametrize("backend", [None, "tflite", "onnx"])
def test_each_backend_runs_from_the_folder(three_formats, backend, edgert_cmd):
    out, _, _ = three_formats
    cmd = [*edgert_cmd, "run", "Once upon a time", "--model", str(out), "--max-tokens", "4", "--temp", "0",
           "--threads", "2", "--json"]
    if backend:
        cmd += ["--backend", backend]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "text" in json.loads(res.stdout)


def test_the_store_keeps_what_tflite_and_onnx_need(three_formats, edgert_cmd):
    from edge_runtime.models.locations import store_root
    from edge_runtime.models.spec import find_artifacts
    from edge_runtime.models.store import add_model

    out, _, _ = three_formats
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


def test_without_gguf_the_first_formats_base_is_the_quality_reference(tiny_llama_dir, prose_file, tmp_path):
    from edge_runtime.converters.build import BuildRequest, build

    request = BuildRequest(source=str(tiny_llama_dir), out=str(tmp_path / "onnx-only"), formats=("onnx",),
                           quants=("int8",), text=str(prose_file), n_ctx=64, n_chunks=2, threads=2,
                           add_to_store=False)
    result = build(request)
    artifacts = {a.quant: a for a in result.manifest.artifacts}
    assert set(artifacts) == {"fp32", "int8"} and artifacts["fp32"].role == "base"
    assert result.manifest.evaluation["base_sha256"] == artifacts["fp32"].sha256
    assert artifacts["fp32"].quality["kld_mean"] is None and artifacts["fp32"].quality["ppl"] > 1
    assert 0 < artifacts["int8"].quality["kld_mean"] < 0.05 and artifacts["int8"].quality["n_tokens"] == 2 * 31
