"""The real `edgert` process: piped chat, run, models list, Ctrl-C, and bad model files."""

from __future__ import annotations

import json
import re
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

STATS_LINE = re.compile(
    r"^ttft_ms=\d+(\.\d+)? prompt_tokens=\d+ gen_tokens=\d+ prefill_tok_s=\d+(\.\d+)? decode_tok_s=\d+(\.\d+)?$"
)


def edgert(cmd, *args, stdin=None, timeout=180):
    return subprocess.run([*cmd, *args], input=stdin, capture_output=True, text=True, timeout=timeout)


def test_run_prints_only_the_completion_and_stats_on_stderr(edgert_cmd):
    res = edgert(edgert_cmd, "run", "The capital of France is", "--temp", "0", "--max-tokens", "12",
                 "--threads", "2", "--stats")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()
    lines = res.stderr.strip().splitlines()
    assert STATS_LINE.match(lines[-1]), lines


def test_run_json_is_one_document(edgert_cmd):
    res = edgert(edgert_cmd, "run", "Hello", "--chat", "--temp", "0", "--max-tokens", "8", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["finish_reason"] in ("stop", "length")
    assert doc["stats"]["gen_tokens"] <= 8 and isinstance(doc["text"], str)
    assert doc["model"] == "SmolLM2-135M-Instruct Q4_1"


def test_greedy_run_is_deterministic(edgert_cmd):
    args = ("run", "Once upon a time", "--temp", "0", "--max-tokens", "16")
    assert edgert(edgert_cmd, *args).stdout == edgert(edgert_cmd, *args).stdout


def test_piped_chat_answers_each_line_and_runs_commands(edgert_cmd, tmp_path):
    saved = tmp_path / "conv.json"
    script = "\n".join([
        "/system You answer in one short sentence.",
        "What is the capital of France?",
        "/stats",
        "And of Italy?",
        f"/save {saved}",
        "/reset",
        f"/load {saved}",
        "/nonsense",
        "/exit",
        "never read",
    ]) + "\n"
    res = edgert(edgert_cmd, "chat", "--temp", "0", "--max-tokens", "24", "--stats", stdin=script)
    assert res.returncode == 0, res.stderr
    answers = [line for line in res.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2
    assert len([line for line in res.stderr.splitlines() if STATS_LINE.match(line)]) == 2
    assert "tok generated" in res.stderr  # /stats
    assert "unknown command /nonsense" in res.stderr
    conv = json.loads(saved.read_text())
    assert conv["system"].startswith("You answer")
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant", "user", "assistant"]
    assert "loaded 4 messages" in res.stderr


def test_ctrl_c_stops_the_answer_and_the_chat_goes_on(edgert_cmd):
    proc = subprocess.Popen([*edgert_cmd, "chat", "--temp", "0", "--max-tokens", "400"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.stdin.write(b"Count from 1 to 300, separated by commas.\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started streaming
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        _, err = proc.communicate(b"Say hi.\n", timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"(stopped)" in err
    assert b"Traceback" not in err


def test_models_list_shows_the_embedded_model(edgert_cmd):
    res = edgert(edgert_cmd, "models", "list", "--json")
    assert res.returncode == 0, res.stderr
    entries = {e["name"]: e for e in json.loads(res.stdout)}
    smol = entries["smollm2"]
    assert smol["quant"] == "Q4_1" and smol["arch"] == "llama" and smol["n_ctx_train"] == 8192
    assert len(smol["sha256"]) == 64 and smol["size_bytes"] > 90_000_000
    table = edgert(edgert_cmd, "models", "list")
    assert "smollm2" in table.stdout and "Q4_1" in table.stdout


# -- bad model files: one line, exit 1, no traceback, no crash -------------------------------

def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_files(tmp: Path, real: Path) -> dict[str, Path]:
    data = real.read_bytes()
    files = {
        "missing": tmp / "missing.gguf",
        "empty": tmp / "empty.gguf",
        "not_gguf": tmp / "notes.gguf",
        "truncated_header": tmp / "trunc_header.gguf",
        "truncated_data": tmp / "trunc_data.gguf",
        "huge_tensor_count": tmp / "huge_tensors.gguf",
        "huge_kv_count": tmp / "huge_kv.gguf",
        "unknown_arch": tmp / "arch.gguf",
    }
    files["empty"].write_bytes(b"")
    files["not_gguf"].write_text("just some notes, not a model\n")
    files["truncated_header"].write_bytes(data[:50_000])
    files["truncated_data"].write_bytes(data[: len(data) // 2])
    files["huge_tensor_count"].write_bytes(data[:8] + struct.pack("<Q", 2**62) + data[16:4096])
    files["huge_kv_count"].write_bytes(data[:16] + struct.pack("<Q", 2**63 - 1) + data[24:4096])
    _tiny_gguf(files["unknown_arch"], "notarealarch")
    return files


@pytest.mark.parametrize("kind", ["missing", "empty", "not_gguf", "truncated_header", "truncated_data",
                                  "huge_tensor_count", "huge_kv_count", "unknown_arch"])
def test_a_bad_model_file_is_one_line_and_exit_1(edgert_cmd, tmp_path, smollm2_path, kind):
    path = bad_files(tmp_path, smollm2_path)[kind]
    res = edgert(edgert_cmd, "run", "hi", "--model", str(path), "--max-tokens", "2", timeout=60)
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert lines and lines[0].startswith("error: ") and path.name in lines[0], res.stderr
    assert len(lines) <= 2 and "Traceback" not in res.stderr
    assert res.stdout == ""


def test_unknown_model_name_gives_a_hint(edgert_cmd):
    res = edgert(edgert_cmd, "run", "hi", "--model", "no-such-model")
    assert res.returncode == 1
    assert res.stderr.startswith("error: unknown model 'no-such-model'")
    assert "hint: " in res.stderr and "smollm2" in res.stderr


def test_usage_errors_exit_2(edgert_cmd):
    assert edgert(edgert_cmd, "run", "hi", "--ctx", "-5").returncode == 2
    assert edgert(edgert_cmd, "run").returncode == 2
