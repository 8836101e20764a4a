"""The llama.cpp backend on the real embedded models: streaming, prefix reuse, cancel, limits."""

from __future__ import annotations

import pytest

from edge_runtime.backends.base import CancelToken, SamplingParams, Settings
from edge_runtime.backends.llamacpp.model import LlamaCppModel
from edge_runtime.errors import ContextLengthExceededError, EdgeRuntimeError

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def run(model, tokens, params=GREEDY, cancel=None):
    """Generate; return (tokens, text, last event)."""
    out, text, last = [], [], None
    for event in model.generate(tokens, params, cancel=cancel):
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


def test_second_call_evaluates_only_the_new_tokens(smollm2):
    smollm2.reset()
    first = smollm2.tokenize("The river ran through the valley and", add_bos=smollm2.info.add_bos)
    generated, _, last = run(smollm2, first)
    assert last.stats.cached_tokens == 0
    follow = smollm2.tokenize(" Then the rain came.", special=False)
    second = first + generated + follow
    before = smollm2.evaluated_total
    _, _, last = run(smollm2, second)
    # Cached: the first prompt and every generated token that was fed back (all but the last).
    assert last.stats.cached_tokens == len(first) + len(generated) - 1
    assert last.stats.evaluated_tokens == len(follow) + 1
    assert smollm2.evaluated_total - before == last.stats.evaluated_tokens + last.stats.gen_tokens - 1


def test_reuse_gives_the_same_greedy_output_as_a_fresh_cache(smollm2):
    base = smollm2.tokenize("Write a list of fruits: apple, banana,", add_bos=smollm2.info.add_bos)
    run(smollm2, base)
    branch = base[:5] + smollm2.tokenize(" cherry and grapes are", special=False)
    reused, _, last = run(smollm2, branch)
    assert last.stats.cached_tokens == 5
    smollm2.reset()
    fresh, _, last = run(smollm2, branch)
    assert last.stats.cached_tokens == 0
    assert reused == fresh


def test_identical_prompt_twice_reevaluates_only_the_last_token(smollm2):
    prompt = smollm2.tokenize("Two plus two equals", add_bos=smollm2.info.add_bos)
    a, _, _ = run(smollm2, prompt)
    b, _, last = run(smollm2, prompt)
    assert a == b
    assert last.stats.evaluated_tokens == 1


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


def test_cancel_stops_between_tokens_and_leaves_a_usable_cache(smollm2):
    prompt = smollm2.tokenize("1, 2, 3, 4, 5, 6,", add_bos=smollm2.info.add_bos)
    cancel = CancelToken()
    got = []
    stream = smollm2.generate(prompt, SamplingParams(temperature=0, max_tokens=200), cancel=cancel)
    for event in stream:
        if event.token is not None:
            got.append(event.token)
        if len(got) == 3 and not cancel.cancelled:
            cancel.cancel()
        last = event
    assert last.finish_reason == "cancelled"
    # The scheduler may have sampled one more token before it saw the cancel: within one token.
    assert len(got) in (3, 4) and last.stats.gen_tokens == len(got)
    after, _, _ = run(smollm2, prompt)
    smollm2.reset()
    fresh, _, _ = run(smollm2, prompt)
    assert after == fresh


def test_cancel_before_prefill_returns_nothing(smollm2):
    cancel = CancelToken()
    cancel.cancel()
    prompt = smollm2.tokenize("Hello there", add_bos=smollm2.info.add_bos)
    tokens, text, last = run(smollm2, prompt, cancel=cancel)
    assert tokens == [] and text == "" and last.finish_reason == "cancelled"


def test_stop_string_ends_the_answer_and_is_not_shown(smollm2):
    prompt = smollm2.tokenize("1, 2, 3, 4, 5,", add_bos=smollm2.info.add_bos)
    _, free_text, _ = run(smollm2, prompt, SamplingParams(temperature=0, max_tokens=20))
    assert "8" in free_text
    params = SamplingParams(temperature=0, max_tokens=20, stop=("8",))
    _, text, last = run(smollm2, prompt, params)
    assert last.finish_reason == "stop"
    assert "8" not in text and free_text.startswith(text)


def test_prompt_longer_than_the_context_is_an_error_before_streaming(smollm2):
    with pytest.raises(ContextLengthExceededError) as info:
        smollm2.generate([1] * 4096, GREEDY)
    assert info.value.n_ctx == 2048 and info.value.n_tokens == 4096
    with pytest.raises(EdgeRuntimeError):
        smollm2.generate([], GREEDY)
    with pytest.raises(EdgeRuntimeError, match="outside the vocabulary"):
        smollm2.generate([1, smollm2.info.n_vocab], GREEDY)


def test_generation_stops_at_the_end_of_the_context(smollm2_path):
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=64, n_threads=2)) as model:
        prompt = model.tokenize("word " * 50, add_bos=False)[:50]
        tokens, _, last = run(model, prompt, SamplingParams(temperature=0, max_tokens=100))
        assert last.finish_reason == "length"
        assert len(prompt) + len(tokens) <= 64


def test_seeded_sampling_is_reproducible(smollm2):
    prompt = smollm2.tokenize("My favourite colour is", add_bos=smollm2.info.add_bos)
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16, seed=7)
    a, _, _ = run(smollm2, prompt, params)
    b, _, _ = run(smollm2, prompt, params)
    c, _, _ = run(smollm2, prompt, SamplingParams(**{**params.__dict__, "seed": 8}))
    assert a == b and a != c


def test_a_second_stream_while_one_runs_is_refused(smollm2):
    prompt = smollm2.tokenize("Hi", add_bos=smollm2.info.add_bos)
    first = smollm2.generate(prompt, GREEDY)
    next(first)
    with pytest.raises(EdgeRuntimeError, match="already generating"):
        next(smollm2.generate(prompt, GREEDY))
    first.close()
    run(smollm2, prompt)  # the lock is released when the first stream is closed


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
