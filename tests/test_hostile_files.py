"""Hostile files and values at the edges: writes that would replace a device, reads that would never
end, JSON nested without bound, option values no device can honour, an unusable EDGERT_HOME, and
read-only commands that must write nothing. Real files and device nodes made here, the real CLI."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edge_runtime.cli import cli
from edge_runtime.errors import InvalidConfigError
from edge_runtime.files import (
    MAX_JSON_DEPTH,
    atomic_path,
    atomic_write,
    atomic_writer,
    parse_json,
    read_regular_file,
)


def make_device(path: Path, minor: int = 3) -> Path:
    """A character device node of our own for /dev/null's (minor 3) or /dev/zero's (5) device."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    return path


def hidden_temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


# -- writes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["atomic_write", "atomic_writer", "atomic_path"])
def test_every_writer_refuses_to_replace_a_device_a_pipe_or_a_folder(tmp_path, writer):
    device, fifo, folder = make_device(tmp_path / "dev"), tmp_path / "fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    for path, words in ((device, "a character device"), (fifo, "a named pipe"), (folder, "a folder"),
                        (device.with_name("link-to-dev"), "a character device"), (dangling, "link to nothing")):
        if path.name == "link-to-dev":
            path.symlink_to(device)
        with pytest.raises(InvalidConfigError, match=words):
            if writer == "atomic_write":
                atomic_write(path, "x")
            elif writer == "atomic_writer":
                with atomic_writer(path) as fh:
                    fh.write(b"x")
            else:
                with atomic_path(path) as tmp:
                    tmp.write_bytes(b"x")
    assert stat.S_ISCHR(os.stat(device).st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode) and folder.is_dir()
    assert not dangling.exists() and not (tmp_path / "nowhere").exists()
    assert hidden_temporaries(tmp_path) == []


def test_a_regular_file_and_a_link_to_one_are_replaced(tmp_path):
    target = tmp_path / "talk.json"
    atomic_write(target, "first")
    atomic_write(target, "second")
    assert target.read_text() == "second"
    link = tmp_path / "link.json"
    link.symlink_to(target)
    atomic_write(link, "third")
    assert link.is_symlink() and target.read_text() == "third"


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.gguf"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write(b"half")
        raise RuntimeError("killed midway")
    assert target.read_bytes() == b"old" and hidden_temporaries(tmp_path) == []


# -- reads ------------------------------------------------------------------------------------

def test_reading_stops_at_non_regular_files_and_at_the_bound(tmp_path):
    with pytest.raises(InvalidConfigError, match="a character device, not a regular file"):
        read_regular_file(make_device(tmp_path / "zero", 5), 1 << 20)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # no writer: a blocking open would wait for ever
    with pytest.raises(InvalidConfigError, match="a named pipe, not a regular file"):
        read_regular_file(fifo, 1 << 20)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 101)
    with pytest.raises(InvalidConfigError, match="larger than 100 bytes"):
        read_regular_file(big, 100)
    assert read_regular_file(big, 101) == b"x" * 101
    with pytest.raises(InvalidConfigError, match="no such file"):
        read_regular_file(tmp_path / "missing", 100)


def test_json_depth_is_bounded_and_errors_never_echo_the_text():
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(InvalidConfigError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        parse_json(deep, "deep.json")
    shallow_enough = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert parse_json(shallow_enough, "ok.json") is not None
    with pytest.raises(InvalidConfigError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        parse_json("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "just-over.json")
    with pytest.raises(InvalidConfigError) as caught:
        parse_json(b'{"password": "hunter2", oops}', "secret.json")
    assert "hunter2" not in str(caught.value) and "secret.json" in str(caught.value)


# -- the CLI ----------------------------------------------------------------------------------

def usage_error(*args: str) -> str:
    """The error line of an ``edgert`` invocation that must be refused as a usage error (exit 2)."""
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 2, (args, result.output)
    assert "Traceback" not in result.output and "None" not in result.output
    return result.output.strip().splitlines()[-1]


@pytest.mark.parametrize("command", [["run", "hi"], ["chat"], ["serve"], ["plan"], ["bench"],
                                     ["convert", "src"], ["eval", "x.gguf"], ["worker"]])
def test_threads_beyond_the_logical_cpus_are_refused_on_every_command(command):
    line = usage_error(*command, "--threads", "10000")
    assert f"between 1 and {os.cpu_count()}, the logical CPUs of this device (got 10000)" in line
    assert usage_error(*command, "--threads", "0")


@pytest.mark.parametrize("option,value", [("--temp", "nan"), ("--temp", "inf"), ("--top-p", "-inf"),
                                          ("--min-p", "nan"), ("--repeat-penalty", "inf")])
def test_non_finite_numbers_are_refused(option, value):
    assert "must be a finite number" in usage_error("run", "hi", option, value)


def test_non_finite_numbers_are_refused_on_serve():
    assert "must be a finite number" in usage_error("serve", "--queue-timeout", "nan")


@pytest.mark.parametrize("seed", ["-1", "4294967295", "99999999999999999999"])
def test_seeds_outside_32_bits_are_refused(seed):
    assert "between 0 and 4294967294" in usage_error("run", "hi", "--seed", seed)


@pytest.mark.parametrize("command", [["run", "hi"], ["chat"], ["serve"], ["plan"], ["bench"]])
def test_an_empty_model_is_refused_not_taken_for_the_default(command):
    assert "'--model'" in usage_error(*command, "--model", "")
    assert "empty" in usage_error(*command, "--model", "  ")


def test_bounds_read_as_words_everywhere():
    assert "must be at least 16 (got 5)" in usage_error("run", "hi", "--ctx", "5")
    assert "must be between 0 and 1 (got 2)" in usage_error("run", "hi", "--top-p", "2")
    assert "must be between 0 and 65535" in usage_error("serve", "--port", "70000")


def edgert(edgert_cmd, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*edgert_cmd, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "EDGERT_HOME": str(home)})


def test_failing_bench_and_convert_print_no_blank_line_first(edgert_cmd, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    for args in (["convert", str(source), "--out", str(tmp_path / "out")],
                 ["bench", "--model", "smollm2", "--threads", "1", "--prompt-tokens", "8", "--gen-tokens", "2",
                  "--reps", "1", "--warmup", "0", "--json", str(make_device(tmp_path / "dev"))]):
        result = edgert(edgert_cmd, *args, home=tmp_path / "home")
        assert result.returncode == 1, result.stderr
        assert result.stderr.startswith("error: "), repr(result.stderr[:200])
        assert len(result.stderr.strip().splitlines()) <= 2  # error and hint


def test_report_on_a_deeply_nested_file_is_one_line(edgert_cmd, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    result = edgert(edgert_cmd, "report", str(deep), "--out", str(tmp_path / "report"), home=tmp_path / "home")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: {deep}: JSON nested deeper than")
    assert "RecursionError" not in result.stderr and "internal error" not in result.stderr


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_read_only_commands_write_nothing_and_list_the_chunked_model_unjoined(edgert_cmd, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    for args in (["models", "list"], ["models", "show", "gemma3-270m"], ["device"], ["plan"],
                 ["plan", "--model", "gemma3-270m", "--json"]):
        result = edgert(edgert_cmd, *args, home=home)
        assert result.returncode == 0, result.stderr
        assert tree(home) == [], (args, tree(home))
    listing = edgert(edgert_cmd, "models", "list", "--json", home=home)
    gemma = next(m for m in json.loads(listing.stdout) if m["name"] == "gemma3-270m")
    assert gemma["size_bytes"] > 200 << 20
    missing = tmp_path / "not-yet"
    edgert(edgert_cmd, "models", "list", home=missing)
    assert not missing.exists()


@pytest.mark.parametrize("args", [["models", "list"], ["models", "show", "smollm2"], ["plan"],
                                  ["run", "hi", "--max-tokens", "1"]])
def test_an_edgert_home_that_is_a_file_is_one_line(edgert_cmd, tmp_path, args):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    result = edgert(edgert_cmd, *args, home=home)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"error: {home}: not a folder (EDGERT_HOME={home})")
    assert "internal error" not in result.stderr and "Traceback" not in result.stderr
