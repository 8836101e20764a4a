"""Quality evaluation on the real llama.cpp: perplexity as llama-perplexity computes it, KLD, top-1."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_runtime.converters import evaluate as ev
from edge_runtime.errors import InvalidConfigError

N_CTX = 128


@pytest.fixture(scope="session")
def smollm2_q4_0(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Path:
    """SmolLM2 re-quantized from its Q4_1 to Q4_0 by llama.cpp's own quantizer."""
    from edge_runtime.converters.quantize import quantize_gguf

    out = tmp_path_factory.mktemp("q4_0") / "smollm2-Q4_0.gguf"
    return quantize_gguf(smollm2_path, out, "Q4_0", threads=2, allow_requantize=True).path


def test_perplexity_of_smollm2_is_finite_and_sane(smollm2_path, prose_file):
    report = ev.evaluate(smollm2_path, text=prose_file, n_ctx=N_CTX, n_chunks=2, threads=2)
    assert report.ppl is not None and math.isfinite(report.ppl)
    assert 5 < report.ppl < 200, report  # a 135M model on Shakespeare: tens, not thousands
    assert report.n_chunks == 2 and report.n_ctx == N_CTX
    assert report.n_tokens == 2 * (N_CTX - N_CTX // 2 - 1)  # llama-perplexity's count per window
    assert report.kld_mean is None and report.top1_agreement is None and report.ppl_ref is None
    assert report.text_source == "file" and len(report.text_sha256) == 64


def test_a_model_against_itself_has_zero_kld_and_full_agreement(smollm2_path, prose_file):
    report = ev.evaluate(smollm2_path, smollm2_path, text=prose_file, n_ctx=N_CTX, n_chunks=2, threads=2)
    assert abs(report.kld_mean) < 1e-9
    assert report.top1_agreement == 1.0
    assert report.ppl == pytest.approx(report.ppl_ref, rel=1e-12)
    assert report.delta_ppl_pct == pytest.approx(0.0, abs=1e-9)


def test_q4_0_requantization_differs_from_its_reference(smollm2_path, smollm2_q4_0, prose_file):
    # Two candidates in one pass: the Q4_0 re-quantization and the reference itself.
    q4_0, same = ev.compare([smollm2_q4_0, smollm2_path], smollm2_path, text=prose_file,
                            n_ctx=N_CTX, n_chunks=2, threads=2)
    assert q4_0.kld_mean > 1e-3 and q4_0.top1_agreement < 1.0
    assert q4_0.top1_agreement > 0.3  # still the same model, mostly
    assert q4_0.ppl_ref == pytest.approx(same.ppl) and q4_0.ppl != pytest.approx(q4_0.ppl_ref)
    assert abs(same.kld_mean) < 1e-9 and same.top1_agreement == 1.0


def test_without_a_text_kld_is_measured_on_generated_text(smollm2_path, smollm2_q4_0, monkeypatch):
    monkeypatch.setattr(ev, "GENERATION_PROMPTS", ev.GENERATION_PROMPTS[:2])
    monkeypatch.setattr(ev, "GENERATED_TOKENS", 24)
    report = ev.evaluate(smollm2_q4_0, smollm2_path, n_ctx=N_CTX, threads=2)
    assert report.ppl is None and report.ppl_ref is None and report.text_source == "generated"
    assert report.n_chunks == 2 and 2 <= report.n_tokens <= 2 * 24
    assert report.kld_mean > 0 and 0 < report.top1_agreement <= 1.0
    again = ev.evaluate(smollm2_q4_0, smollm2_path, n_ctx=N_CTX, threads=2)
    assert again.text_sha256 == report.text_sha256  # seeded: the same text every time


def test_perplexity_method_matches_an_independent_numpy_computation(smollm2_path, prose_file):
    """One window, scored two ways: our evaluator, and llama-cpp-python's high-level API + numpy.

    Flash attention on, as llama-perplexity's ``auto`` turns it on for the CPU (off, llama.cpp's
    CPU logits differ by up to ~2 in this model, and perplexity by ~1.5%).
    """
    import llama_cpp

    ours = ev.evaluate(smollm2_path, text=prose_file, n_ctx=N_CTX, n_chunks=1, threads=2)
    llm = llama_cpp.Llama(str(smollm2_path), n_ctx=N_CTX, n_batch=N_CTX, logits_all=True, n_threads=2,
                          flash_attn=True, verbose=False)
    try:
        text = prose_file.read_bytes().decode("utf-8")
        text = text[:-1] if text.endswith("\n") else text
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:N_CTX]
        if llm.metadata.get("tokenizer.ggml.add_bos_token") == "true":
            tokens[0] = llm.token_bos()
        llm.reset()
        llm.eval(tokens)
        logits = np.array(llm.scores[:N_CTX], dtype=np.float64)
    finally:
        llm.close()
    nll = []
    for i in range(N_CTX // 2, N_CTX - 1):  # the second half of the window, as llama-perplexity
        row = logits[i]
        log_z = row.max() + math.log(np.exp(row - row.max()).sum())
        nll.append(log_z - row[tokens[i + 1]])
    assert len(nll) == ours.n_tokens
    assert ours.ppl == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-4)


def test_windows_follow_llama_perplexity():
    tokens = list(range(1000, 1000 + 10 * 64 + 5))
    windows = ev.text_windows(tokens, 64, None, bos=1)
    assert len(windows) == 10  # floor(len / n_ctx), the remainder is dropped
    assert windows[1].tokens[0] == 1 and windows[1].tokens[1:] == tuple(tokens[65:128])
    assert all(w.first == 32 for w in windows)
    assert len(ev.text_windows(tokens, 64, 3, bos=None)) == 3
    assert ev.text_windows(tokens, 64, 3, bos=None)[0].tokens[0] == 1000
    with pytest.raises(InvalidConfigError, match="needs 1300"):
        ev.text_windows(tokens, 650, None, bos=None)


def test_text_file_is_read_as_llama_perplexity_reads_it(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"line one\nline two\n\n")
    text, sha = ev.read_text(path)
    assert text == "line one\nline two\n" and len(sha) == 64  # one trailing newline dropped
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InvalidConfigError, match="not UTF-8"):
        ev.read_text(tmp_path / "bad.txt")
    with pytest.raises(InvalidConfigError, match="no such text file"):
        ev.read_text(tmp_path / "missing.txt")


def test_quality_report_round_trips():
    report = ev.QualityReport(12.5, 12.0, 4.1, 0.01, 0.95, 100, 2, 128, "ab" * 32)
    assert ev.QualityReport.from_dict(json.loads(json.dumps(report.to_dict()))) == report


def _cli():
    from edge_runtime.cli import cli
    from edge_runtime.cli.convert import convert, eval_

    for command in (convert, eval_):
        if command.name not in cli.commands:
            cli.add_command(command)
    return cli


def test_eval_cli_prints_json_and_a_table(smollm2_q4_0, prose_file):
    runner = CliRunner()
    res = runner.invoke(_cli(), ["eval", str(smollm2_q4_0), "--reference", "smollm2", "--text",
                                 str(prose_file), "--ctx", str(N_CTX), "--chunks", "1", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["ppl"] > 1 and data["kld_mean"] > 0 and data["n_chunks"] == 1
    res = runner.invoke(_cli(), ["eval", "smollm2", "--text", str(prose_file), "--ctx", str(N_CTX),
                                 "--chunks", "1"])
    assert res.exit_code == 0, res.output
    assert "perplexity" in res.stdout and "KLD" not in res.stdout


def test_eval_cli_without_text_or_reference_is_one_error_line():
    res = CliRunner().invoke(_cli(), ["eval", "smollm2"])
    assert res.exit_code == 1
    assert res.stderr.startswith("error: nothing to measure") and "Traceback" not in res.output
