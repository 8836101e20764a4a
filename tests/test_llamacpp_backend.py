"""The llama.cpp backend on the real embedded models: streaming, the sliding window, batching.

What every backend promises (prefix reuse, cancel, stop strings, limits, seeds) is in tests/contract/.
"""

from __future__ import annotations

import pytest

from edge_runtime.backends.base import SamplingParams, Settings
from edge_runtime.backends.llamacpp.model import LlamaCppModel
from edge_runtime.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def run(model, tokens, params=GREEDY):
    """Generate; return (tokens, text, last event)."""
    out, text, last = [], [], None
    for event in model.generate(tokens, params):
        if event.token is not None:
            out.append(event.token)
        text.append(event.text)
        last = event
    return out, "".join(text), last


def test_streams_tokens_and_finishes_with_stats(smollm2):
    prompt = smollm2.tokenize("Once upon a time, in a small village,", add_bos=smollm2.info.add_bos)
    tokens, text, last = run(smollm2, prompt)
    assert len(tokens) == 24 and text.strip()
    assert last.finish_reason == "length"
    stats = last.stats
    assert stats.prompt_tokens == len(prompt) and stats.gen_tokens == 24
    assert stats.ttft_s > 0 and stats.decode_tok_s > 0
    assert smollm2.detokenize(tokens) == text


def test_sliding_window_cache_is_not_trusted_past_its_window(gemma_path, prose):
    """Gemma 3's SWA layers evict old positions: a branch far back must be re-evaluated."""
    settings = Settings(n_ctx=2048, n_threads=2, n_batch=256, n_ubatch=256)
    with LlamaCppModel(str(gemma_path), settings) as model:
        text_tokens = model.tokenize(prose[:40000], add_bos=False)
        assert len(text_tokens) > 5020
        bos = model.tokenize("", add_bos=True)
        long_prompt = bos + text_tokens[:1200]
        run(model, long_prompt, SamplingParams(temperature=0, max_tokens=4))
        branch = long_prompt[:60] + text_tokens[3000:3040]
        reused, _, last = run(model, branch)
        assert last.stats.cached_tokens == 0, "the window needed by the branch was evicted"
        model.reset()
        fresh, _, _ = run(model, branch)
        assert reused == fresh
        # Extending the cached prompt stays inside the window: reuse is allowed and exact.
        extended = branch + text_tokens[5000:5020]
        reused_ext, _, last = run(model, extended)
        assert last.stats.cached_tokens > len(branch) - 1
        model.reset()
        fresh_ext, _, _ = run(model, extended)
        assert reused_ext == fresh_ext


def test_model_info_comes_from_the_file(smollm2):
    info = smollm2.info
    assert info.arch == "llama" and info.quant == "Q4_1"
    assert info.n_ctx_train == 8192 and info.n_ctx == 2048
    assert info.chat_template and "<|im_start|>" in info.chat_template
    assert info.eos_token == "<|im_end|>"


def test_use_mmap_off_reaches_llama_cpp(smollm2_path):
    import llama_cpp

    fields = {name for name, _ in llama_cpp.llama_model_default_params()._fields_}
    assert "load_mode" in fields  # the field the backend sets for use_mmap
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=256, n_threads=2, use_mmap=False)) as model:
        tokens, _, last = run(model, model.tokenize("Hello", add_bos=model.info.add_bos))
        assert tokens and last.finish_reason in ("stop", "length")


def test_prompts_arriving_together_are_prefilled_one_after_another(smollm2_path):
    """Continuous batching: decodes share every step, but one prompt is evaluated at a time (the
    first answers while the next is evaluated), and batched answers equal the solo ones."""
    from collections import Counter

    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=2048, n_parallel=2, n_threads=2)) as model:
        batches = []
        decode = model.context.decode

        def observed(entries):
            batches.append(Counter(seq for _, _, seq, _ in entries))
            decode(entries)

        model.context.decode = observed
        long = model.tokenize("The river runs past the mill and the old stone bridge. " * 60, add_bos=True)
        short = model.tokenize("The capital of France is", add_bos=True)
        assert len(long) > 512  # more than one batch: still prefilling when the short prompt arrives
        with model.acquire_slot(long) as a, model.acquire_slot(short) as b:
            first, second = a.generate(long, GREEDY), b.generate(short, GREEDY)
            together = ([e.token for e in first if e.token is not None],
                        [e.token for e in second if e.token is not None])
        prefilling = [[seq for seq, rows in batch.items() if rows > 1] for batch in batches]
        assert all(len(seqs) <= 1 for seqs in prefilling), batches
        assert {seqs[0] for seqs in prefilling if seqs} == {0, 1}
        assert any(len(batch) == 2 for batch in batches)  # and the two did share decode steps
        model.context.decode = decode
        model.reset()
        # The first tokens, where a near-tie flipped by another batch shape is least likely.
        alone = (run(model, long)[0], run(model, short)[0])
        assert [t[:8] for t in together] == [t[:8] for t in alone]


def test_logit_rows_give_every_position_and_leave_the_cache_alone(smollm2, prose):
    import numpy as np

    prompt = smollm2.tokenize("The capital of France is", add_bos=smollm2.info.add_bos)
    greedy, _, _ = run(smollm2, prompt, SamplingParams(temperature=0, max_tokens=1))
    rows = list(smollm2.logit_rows(prompt, 2))
    assert [pos for pos, _ in rows] == [2]
    (_, block), = rows
    assert block.dtype == np.float32 and block.shape == (len(prompt) - 2, smollm2.info.n_vocab)
    assert int(block[-1].argmax()) == greedy[0]  # the same model, whichever context runs it
    _, _, last = run(smollm2, prompt, SamplingParams(temperature=0, max_tokens=1))
    assert last.stats.cached_tokens == len(prompt) - 1  # scoring used a context of its own
    # Longer than a batch: the rows come batch by batch, every position once, in order.
    long = smollm2.tokenize(prose[:6000], add_bos=False)[:700]
    positions = [(pos, len(block)) for pos, block in smollm2.logit_rows(long, 100)]
    assert len(positions) > 1 and positions[0][0] == 100
    assert all(p + n == q for (p, n), (q, _) in zip(positions, positions[1:], strict=False))
    assert sum(n for _, n in positions) == len(long) - 100
    with pytest.raises(InvalidRequestError):
        smollm2.logit_rows([], 0)
