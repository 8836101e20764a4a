"""What ``Model.generate`` promises on every backend: prefix reuse, cancel, stop strings, the context
limit, bad prompts, seeded sampling and slots, checked on the same tiny model converted three ways."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edge_runtime.backends.base import CancelToken, SamplingParams
from edge_runtime.errors import ContextLengthExceededError, EdgeRuntimeError, SlotsBusyError

from .streams import GREEDY, N_CTX, OTHER_PROMPT, PROMPT, SAMPLED, collect, run


def prompt_tokens(model, text: str = PROMPT) -> list[int]:
    """``text`` as a prompt: BOS first where the model wants one."""
    return model.tokenize(text, add_bos=model.info.add_bos)


# -- prefix reuse ----------------------------------------------------------------------------


def test_a_prompt_that_extends_the_last_evaluates_only_the_new_tokens(model):
    prompt = prompt_tokens(model)
    model.reset()
    first = run(model, prompt)
    assert first.stats.cached_tokens == 0 and first.stats.evaluated_tokens == len(prompt)
    assert len(first.tokens) >= 6, first.tokens  # enough of an answer to build on
    follow = model.tokenize(" and then the rain came.")
    longer = prompt + first.tokens[:4] + follow
    second = run(model, longer)
    # The first prompt and the answer's tokens (fed back as they were generated) are cached.
    assert second.stats.cached_tokens == len(prompt) + 4
    assert second.stats.evaluated_tokens == len(follow)
    model.reset()
    fresh = run(model, longer)
    assert fresh.stats.cached_tokens == 0 and fresh.stats.evaluated_tokens == len(longer)
    assert second.tokens == fresh.tokens and second.text == fresh.text


def test_a_prompt_that_branches_off_rewinds_to_the_shared_start(model):
    prompt = prompt_tokens(model)
    run(model, prompt)
    again = run(model, prompt)  # the same prompt: only its last token is evaluated again
    assert again.stats.cached_tokens == len(prompt) - 1 and again.stats.evaluated_tokens == 1
    branch = prompt[:5] + model.tokenize(" " + OTHER_PROMPT)
    reused = run(model, branch)
    assert reused.stats.cached_tokens == 5 and reused.stats.evaluated_tokens == len(branch) - 5
    model.reset()
    assert run(model, branch).tokens == reused.tokens


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_ends_the_stream_within_one_token_and_the_model_stays_usable(model):
    prompt = prompt_tokens(model)
    model.reset()
    expected = run(model, prompt)
    assert len(expected.tokens) >= 4, expected.tokens  # a cut would show
    cancel = CancelToken()
    events = []
    for event in model.generate(prompt, GREEDY, cancel=cancel):
        events.append(event)
        if event.token is not None:
            cancel.cancel()
    got = collect(events)
    assert got.finish_reason == "cancelled"
    assert 1 <= len(got.tokens) <= 2 and got.stats.gen_tokens == len(got.tokens)
    assert got.tokens == expected.tokens[: len(got.tokens)] and expected.text.startswith(got.text)
    assert run(model, prompt).tokens == expected.tokens


def test_a_generation_cancelled_before_it_starts_gives_nothing(model):
    cancel = CancelToken()
    cancel.cancel()
    got = run(model, prompt_tokens(model), cancel=cancel)
    assert got.tokens == [] and got.text == "" and got.finish_reason == "cancelled"


# -- stop strings ----------------------------------------------------------------------------


def test_a_stop_string_ends_the_text_before_it(model):
    prompt = prompt_tokens(model)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    full = run(model, prompt, params)
    pieces = [e.text for e in full.events if e.text]
    assert len(pieces) >= 6, pieces
    middle = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    # And one that starts in one token's text and ends in the next one's: held back, then dropped.
    at = len("".join(pieces[:3]))
    across = full.text[at - 2: at + 2]
    for stop in (middle, across):
        assert stop.strip(), full.text
        got = run(model, prompt, replace(params, stop=("<a stop string that never comes>", stop)))
        assert got.finish_reason == "stop", (stop, got.text)
        assert got.text == full.text[: full.text.index(stop)] and stop not in got.text


# -- the context limit and bad prompts -------------------------------------------------------


def prose_tokens(model, prose: str, n: int) -> list[int]:
    """A prompt of exactly ``n`` tokens of prose."""
    tokens = (prompt_tokens(model, "") + model.tokenize(prose[:4000]))[:n]
    assert len(tokens) == n
    return tokens


def test_a_generation_that_reaches_the_end_of_the_context_finishes_with_length(model, prose):
    assert model.info.n_ctx == N_CTX
    prompt = prose_tokens(model, prose, N_CTX - 4)
    got = run(model, prompt, SamplingParams(max_tokens=50, temperature=0.0))
    assert got.finish_reason == "length", got.tokens
    # Up to the context's last position: the last token generated is never evaluated, so it fits.
    assert got.stats.prompt_tokens == len(prompt) and got.stats.gen_tokens == len(got.tokens) == 4


def test_a_prompt_that_does_not_fit_is_refused_before_streaming(model, prose):
    prompt = prose_tokens(model, prose, N_CTX)
    with pytest.raises(ContextLengthExceededError) as err:
        model.generate(prompt, GREEDY)
    assert (err.value.n_tokens, err.value.n_ctx) == (N_CTX, N_CTX) and err.value.http_status == 400
    assert run(model, prompt[: N_CTX // 2]).finish_reason in ("stop", "length")  # and nothing broke


@pytest.mark.parametrize("bad", ["empty", "past the vocabulary", "negative"])
def test_a_bad_prompt_is_a_user_error(model, bad):
    tokens = {"empty": [], "past the vocabulary": [1, model.info.n_vocab], "negative": [1, -1]}[bad]
    with pytest.raises(EdgeRuntimeError) as err:
        model.generate(tokens, GREEDY)
    # A 4xx for the server (a client's mistake), one line for the CLI.
    assert err.value.http_status < 500, type(err.value)
    assert err.value.message and "\n" not in err.value.message


# -- seeded sampling -------------------------------------------------------------------------


def test_a_seed_reproduces_a_sampled_answer_with_or_without_the_cache(model):
    prompt = prompt_tokens(model)
    model.reset()
    first = run(model, prompt, SAMPLED)
    cached = run(model, prompt, SAMPLED)
    assert cached.stats.cached_tokens == len(prompt) - 1
    model.reset()
    fresh = run(model, prompt, SAMPLED)
    assert first.tokens == cached.tokens == fresh.tokens and len(first.tokens) >= 4
    others = [run(model, prompt, replace(SAMPLED, seed=seed)).tokens for seed in (8, 9, 10)]
    assert any(tokens != first.tokens for tokens in others)


# -- slots -----------------------------------------------------------------------------------


def test_a_slot_generates_as_the_model_does_and_keeps_its_cache(model):
    prompt = prompt_tokens(model)
    model.reset()
    expected = run(model, prompt)
    with model.acquire_slot(prompt, timeout=30) as slot:
        with pytest.raises(SlotsBusyError) as err, model.acquire_slot(prompt, timeout=0.05):
            pass  # the model's only slot is held: the wait runs out
        assert err.value.http_status == 503
        got = run(slot, prompt)
    assert got.tokens == expected.tokens and got.stats.cached_tokens == len(prompt) - 1


def test_a_second_stream_while_one_runs_is_refused(model):
    prompt = prompt_tokens(model)
    first = model.generate(prompt, GREEDY)
    next(first)
    with pytest.raises(EdgeRuntimeError, match="already generating"):
        next(model.generate(prompt, GREEDY))  # a model of one slot refuses rather than wait
    first.close()
    assert run(model, prompt).tokens  # closing the first stream let the slot go


def test_two_slots_keep_their_own_caches(converted):
    if converted.backend == "tflite":
        pytest.skip("a LiteRT model holds one sequence, whatever n_parallel asks (see backends/tflite)")
    with converted.load(n_parallel=2) as model:
        a, b = prompt_tokens(model), prompt_tokens(model, OTHER_PROMPT)
        with model.acquire_slot(a, timeout=30) as first, model.acquire_slot(b, timeout=30) as second:
            out_a, out_b = run(first, a), run(second, b)
        for prompt, out in ((b, out_b), (a, out_a)):
            with model.acquire_slot(prompt, timeout=30) as slot:  # the slot that holds this prompt
                again = run(slot, prompt)
            assert again.stats.cached_tokens == len(prompt) - 1 and again.tokens == out.tokens
        model.reset()
        assert run(model, a).tokens == out_a.tokens and run(model, b).tokens == out_b.tokens


def test_token_bytes_keep_the_pieces_of_a_character_split_over_tokens(model):
    """Logprobs' ``bytes``: each token's own bytes, so a client joins a split character back."""
    text = "A check ✓, Japan 日本, and héllo."
    pieces = [model.token_bytes(t) for t in model.tokenize(text)]
    assert b"".join(pieces) == text.encode()

    def whole(piece: bytes) -> bool:
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    assert not all(whole(p) for p in pieces)  # the tiny vocabulary splits these characters
    assert model.token_bytes(model.info.n_vocab + 7) == b""
    eos = model.tokenize(model.info.eos_token, special=True)
    assert len(eos) == 1 and model.token_bytes(eos[0]) == model.info.eos_token.encode()
