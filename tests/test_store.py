"""The model store and manifests: add, list, show, verify, rm; damaged manifests are reported."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from synthetic_gguf import Q, write_llama_gguf

from edge_runtime.errors import InvalidConfigError, InvalidModelFileError, ModelNotFoundError
from edge_runtime.files import file_sha256
from edge_runtime.models import spec as model_spec
from edge_runtime.models import store
from edge_runtime.models.locations import store_root
from edge_runtime.models.manifest import Manifest, read_manifest, verify_manifest, write_manifest
from edge_runtime.planning.planner import choose_plan
from edge_runtime.planning.profiles import get_profile

GIB = 1 << 30
TINY = dict(n_layer=2, n_embd=256, n_ff=512, n_head=4, n_head_kv=2, n_vocab=1024, n_ctx_train=2048)


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store of this test's own (the session one is shared with other tests)."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGERT_HOME", str(home))
    return home


def convert_output(folder: Path, types=(Q.F16, Q.Q8_0, Q.Q4_0), model: str = "tiny") -> Path:
    """A folder shaped like an `edgert convert` output: small GGUFs and a manifest."""
    from edge_runtime.converters.build_steps import artifact_entry

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for qtype in types:
        path = write_llama_gguf(folder / f"{model}-{qtype.name}.gguf", qtype=qtype, name=model, **TINY)
        role = "base" if qtype == Q.F16 else "quantized"
        entries.append(artifact_entry(path, role, ("raspberry-pi-5-8gb",) if qtype == Q.Q4_0 else (), {}))
    manifest = Manifest(model=model, source={"kind": "gguf", "name": "synthetic", "sha256": "0" * 64},
                        tools={"edge_runtime": "test"}, artifacts=tuple(entries), folder=folder)
    write_manifest(folder, manifest)
    return folder


def machine(total_gib: float, available_gib: float):
    """A hand-built 4-core ARM board with llama.cpp on the CPU (what this machine is not)."""
    from edge_runtime.backends.base import Availability
    from edge_runtime.device.info import CpuInfo, DeviceInfo, MemoryInfo

    return DeviceInfo(
        cpu=CpuInfo(model="test cpu", arch="aarch64", physical_cores=4, logical_cores=4,
                    performance_cores=4, flags=("neon", "dotprod")),
        memory=MemoryInfo(total_bytes=int(total_gib * GIB), available_bytes=int(available_gib * GIB)),
        gpus=(), backends=(Availability(name="llama.cpp", available=True, version="0.3.36", devices=("CPU",)),),
    )


def edit_manifest(folder: Path, change, *, fix_digest: bool) -> None:
    """Change the manifest by hand; ``fix_digest`` recomputes the digest as the format defines it."""
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    if fix_digest:
        body = {k: v for k, v in data.items() if k != "digest"}
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        data["digest"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(data, indent=2))


def cli(*args: str):
    from edge_runtime.cli import cli as group

    return CliRunner().invoke(group, list(args))


def test_a_convert_output_gives_every_artifact_and_the_planner_walks_the_ladder(tmp_path):
    folder = convert_output(tmp_path / "out")
    found = model_spec.find_artifacts(str(folder))
    assert [a.quant for a in found] == ["F16", "Q8_0", "Q4_0"]
    assert all(Path(a.path).is_file() and len(a.sha256) == 64 for a in found)
    device = machine(8, 6)
    plan = choose_plan(found, device, get_profile("raspberry-pi-5-8gb"))
    assert plan.artifact.quant == "Q4_0"  # rung 1, although the manifest lists it last
    assert any("rung 1 of the raspberry-pi-5-8gb" in r for r in plan.reasons)
    no_q4 = [a for a in found if a.quant != "Q4_0"]
    assert choose_plan(no_q4, device, get_profile("laptop-x86-16gb")).artifact.quant == "Q8_0"


def test_add_list_show_and_find_by_name(tmp_path):
    folder = convert_output(tmp_path / "out")
    manifest = store.add_model(folder)
    assert manifest.model == "tiny" and manifest.folder == store_root() / "tiny"
    stored = model_spec.find_artifacts("tiny")
    assert [a.quant for a in stored] == ["F16", "Q8_0", "Q4_0"]
    assert all(Path(a.path).parent == store_root() / "tiny" for a in stored)
    # Same filesystem: hard links, not copies.
    assert os.stat(stored[1].path).st_ino == os.stat(folder / "tiny-Q8_0.gguf").st_ino
    assert [a.quant for a in model_spec.find_artifacts("tiny:q8_0")] == ["Q8_0"]
    assert model_spec.resolve_model("tiny").name == "tiny-Q8_0.gguf"  # the first quantized artifact
    assert model_spec.resolve_model("tiny:F16").name == "tiny-F16.gguf"
    with pytest.raises(ModelNotFoundError, match="no Q2_K"):
        model_spec.find_artifacts("tiny:Q2_K")
    rows = [e for e in store.list_models(with_sha256=False) if e.kind == "store"]
    assert [(e.name, e.quant) for e in rows] == [("tiny", "F16"), ("tiny", "Q8_0"), ("tiny", "Q4_0")]
    res = cli("models", "list")
    assert res.exit_code == 0 and "smollm2" in res.stdout and "tiny-Q4_0.gguf" in res.stdout
    res = cli("models", "show", "tiny", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["model"] == "tiny"
    res = cli("models", "show", "tiny")
    assert "tiny-Q4_0.gguf" in res.stdout and "raspberry-pi-5-8gb" in res.stdout


def test_add_a_single_gguf_file_copies_and_hashes_it(tmp_path):
    path = write_llama_gguf(tmp_path / "Solo-Model.Q8_0.gguf", qtype=Q.Q8_0, **TINY)
    res = cli("models", "add", str(path), "--copy", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["model"] == "solo-model" and data["artifacts"][0]["role"] == "quantized"
    stored = store_root() / "solo-model" / path.name
    assert os.stat(stored).st_ino != os.stat(path).st_ino  # --copy
    assert data["artifacts"][0]["sha256"] == file_sha256(path)
    assert model_spec.find_artifacts("solo-model")[0].path == str(stored)


def test_verify_detects_a_flipped_byte(tmp_path):
    store.add_model(convert_output(tmp_path / "out"), link=False)
    assert cli("models", "verify").exit_code == 0
    victim = store_root() / "tiny" / "tiny-Q8_0.gguf"
    with victim.open("r+b") as fh:
        fh.seek(victim.stat().st_size // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x01]))
    _, checks = store.verify_model("tiny")
    assert [c.status for c in checks] == ["ok", "mismatch", "ok"]
    res = cli("models", "verify")
    assert res.exit_code == 1
    assert "MISMATCH  tiny/tiny-Q8_0.gguf" in res.stdout and res.stderr.startswith("error: ")
    data = json.loads(cli("models", "verify", "tiny", "--json").stdout)
    assert data["ok"] is False and data["models"][0]["files"][1]["status"] == "mismatch"


def test_a_hand_edited_manifest_is_reported_never_used(tmp_path):
    store.add_model(convert_output(tmp_path / "out"))
    entry = store_root() / "tiny"
    edit_manifest(entry, lambda d: d["artifacts"][2].update(quant="Q8_0"), fix_digest=False)
    with pytest.raises(InvalidConfigError, match="edited by hand or damaged"):
        model_spec.find_artifacts("tiny")
    [row] = [e for e in store.list_models(with_sha256=False) if e.kind == "store"]
    assert row.error and "digest" in row.error
    res = cli("models", "show", "tiny")
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "Traceback" not in res.output
    res = cli("models", "verify")
    assert res.exit_code == 1 and "DAMAGED   tiny" in res.stdout
    res = cli("models", "list")
    assert res.exit_code == 0 and "damaged:" in res.stdout


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema_version=99), "newer than this edge-runtime reads"),
    (lambda d: d.update(schema="something-else"), "not an edge-runtime manifest"),
    (lambda d: d["artifacts"][0].update(file="../../etc/passwd"), "a file name beside the manifest"),
    (lambda d: d["artifacts"][0].update(sha256="xyz"), "64 lowercase hex"),
    (lambda d: d["artifacts"][1].update(size_bytes="big"), "size_bytes"),
    (lambda d: d["artifacts"].append(dict(d["artifacts"][0])), "listed twice"),
])
def test_a_manifest_with_a_valid_digest_is_still_checked_field_by_field(tmp_path, change, message):
    folder = convert_output(tmp_path / "out")
    edit_manifest(folder, change, fix_digest=True)
    with pytest.raises(InvalidConfigError, match=message):
        read_manifest(folder)


def test_bad_json_and_a_missing_artifact_are_reported(tmp_path):
    folder = convert_output(tmp_path / "out")
    (folder / "tiny-Q4_0.gguf").unlink()
    with pytest.raises(InvalidConfigError, match="tiny-Q4_0.gguf is missing"):
        model_spec.find_artifacts(str(folder))
    assert [c.status for c in verify_manifest(read_manifest(folder, check_files=False))] == ["ok", "ok", "missing"]
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(InvalidConfigError, match="not valid JSON"):
        model_spec.find_artifacts(str(folder))
    res = cli("models", "add", str(folder))
    assert res.exit_code == 1 and "not valid JSON" in res.stderr
    assert not store_root().exists() or store.store_names() == []


def test_add_refuses_a_folder_whose_files_do_not_match(tmp_path):
    folder = convert_output(tmp_path / "out")
    victim = folder / "tiny-F16.gguf"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(InvalidConfigError, match="tiny-F16.gguf does not match its manifest"):
        store.add_model(folder)
    assert store.store_names() == []
    assert not store_root().exists()  # checked before the store is touched


def test_re_adding_replaces_the_entry_whole_and_rm_removes_it(tmp_path):
    store.add_model(convert_output(tmp_path / "a", types=(Q.F16, Q.Q8_0)))
    store.add_model(convert_output(tmp_path / "b", types=(Q.Q4_0,)))
    assert [a.quant for a in model_spec.find_artifacts("tiny")] == ["Q4_0"]
    assert sorted(p.name for p in (store_root() / "tiny").iterdir()) == ["manifest.json", "tiny-Q4_0.gguf"]
    res = cli("models", "rm", "tiny", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["removed"] == "tiny"
    assert store.store_names() == [] and not (store_root() / "tiny").exists()
    res = cli("models", "rm", "tiny")
    assert res.exit_code == 1 and "no model named 'tiny'" in res.stderr


def test_store_names_are_checked(tmp_path):
    folder = convert_output(tmp_path / "out")
    with pytest.raises(InvalidConfigError, match="embedded model's name"):
        store.add_model(folder, name="smollm2")
    with pytest.raises(InvalidConfigError, match="not a valid name"):
        store.add_model(folder, name="Has Spaces")
    assert store.model_slug("SmolLM2-135M Instruct") == "smollm2-135m-instruct"


def test_a_folder_without_a_manifest_and_unknown_names_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModelFileError, match="without a manifest.json"):
        model_spec.find_artifacts(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="unknown model 'nope'"):
        model_spec.find_artifacts("nope")
    assert model_spec.find_artifacts(None)[0].quant == "Q4_1"  # still the embedded default


def test_atomic_writes_leave_the_old_file_or_the_new_one_and_no_temporary_file(tmp_path):
    from edge_runtime.files import atomic_path, atomic_write, atomic_writer

    folder = tmp_path / "out"
    target = atomic_write(folder / "data.bin", "old")
    with pytest.raises(RuntimeError, match="midway"), atomic_writer(target) as fh:
        fh.write(b"the first half of the new")
        raise RuntimeError("stopped midway")
    assert target.read_text() == "old" and [p.name for p in folder.iterdir()] == ["data.bin"]
    with atomic_path(folder / "lib.bin") as tmp:  # a library writing to a path of its own
        tmp.write_bytes(b"from a library")
        assert not (folder / "lib.bin").exists()
    assert (folder / "lib.bin").read_bytes() == b"from a library"
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "lib.bin").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only mode
    assert sorted(p.name for p in folder.iterdir()) == ["data.bin", "lib.bin"]


def test_joined_chunks_that_fail_their_hash_leave_nothing(tmp_path):
    from edge_runtime.models.embedded import join_parts

    chunks = [tmp_path / f"m.gguf.part{i:02d}" for i in range(2)]
    for i, chunk in enumerate(chunks):
        chunk.write_bytes(bytes([i]) * 1000)
    target = tmp_path / "joined" / "m.gguf"
    with pytest.raises(InvalidModelFileError, match="do not match the expected sha256"):
        join_parts(tuple(map(str, chunks)), target, "0" * 64)
    assert list(target.parent.iterdir()) == []
    join_parts(tuple(map(str, chunks)), target, hashlib.sha256(b"\0" * 1000 + b"\1" * 1000).hexdigest())
    assert target.read_bytes() == b"\0" * 1000 + b"\1" * 1000


def test_replace_folder_swaps_a_whole_folder(tmp_path):
    from edge_runtime.files import replace_folder

    entry, staging = tmp_path / "entry", tmp_path / ".staging"
    entry.mkdir()
    (entry / "old.bin").write_text("old")
    staging.mkdir()
    (staging / "new.bin").write_text("new")
    replace_folder(staging, entry)
    assert [p.name for p in entry.iterdir()] == ["new.bin"] and [p.name for p in tmp_path.iterdir()] == ["entry"]
    staging.mkdir()
    replace_folder(staging, tmp_path / "fresh")  # nothing there yet: a plain rename
    assert (tmp_path / "fresh").is_dir() and not staging.exists()
