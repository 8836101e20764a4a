"""Sessions on the real embedded model: templates, reuse across turns, the context policy."""

from __future__ import annotations

import json

import pytest

from edge_runtime.backends.base import SamplingParams, Settings
from edge_runtime.backends.llamacpp.model import LlamaCppModel
from edge_runtime.errors import ContextLengthExceededError, InvalidConfigError
from edge_runtime.session import FALLBACK_TEMPLATE, Session, TemplateError, compile_template

GREEDY = SamplingParams(temperature=0, max_tokens=32)
QUESTIONS = ["What is the capital of France?", "Name a river there.", "And a mountain?"]


def answer(session: Session, text: str) -> str:
    return "".join(event.text for event in session.send(text))


def test_later_turns_evaluate_only_the_new_message(smollm2):
    smollm2.reset()
    session = Session(smollm2, params=GREEDY)
    answer(session, QUESTIONS[0])
    first = session.last_turn.stats
    answer(session, QUESTIONS[1])
    second = session.last_turn.stats
    # Everything the first turn put in the cache is reused: its prompt and its answer.
    assert second.cached_tokens >= first.prompt_tokens + first.gen_tokens - 2
    new_part = second.prompt_tokens - first.prompt_tokens - first.gen_tokens
    assert second.evaluated_tokens <= new_part + 2
    assert second.evaluated_tokens < second.prompt_tokens / 2


def test_greedy_conversation_is_the_same_with_and_without_reuse(smollm2):
    smollm2.reset()
    reused = Session(smollm2, params=GREEDY)
    reused_answers = [answer(reused, q) for q in QUESTIONS]
    fresh = Session(smollm2, params=GREEDY)
    fresh_answers = []
    for q in QUESTIONS:
        smollm2.reset()
        fresh_answers.append(answer(fresh, q))
        assert fresh.last_turn.stats.cached_tokens == 0
    assert reused_answers == fresh_answers


def test_old_turns_are_dropped_when_the_context_fills_and_the_user_is_told_once(smollm2_path):
    notices: list[str] = []
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=256, n_threads=2)) as model:
        session = Session(model, system="Answer briefly.", params=SamplingParams(temperature=0, max_tokens=24),
                          on_notice=notices.append)
        long_message = "Tell me about the sea and the ships that sail on it. " * 4
        for _ in range(6):
            answer(session, long_message)
            assert session.last_turn.stats.prompt_tokens + 24 <= 256
        assert len(notices) == 1 and "dropped" in notices[0]
        assert len(session.messages) == 12  # the full history is kept for /save
        assert session.system == "Answer briefly."


def test_a_single_message_longer_than_the_context_is_an_error(smollm2_path):
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=128, n_threads=2)) as model:
        session = Session(model, params=SamplingParams(max_tokens=16))
        with pytest.raises(ContextLengthExceededError):
            session.send("word " * 400)
        assert session.messages == []
        answer(session, "Hi")  # the session still works afterwards


def test_save_and_load_round_trip(smollm2, tmp_path):
    session = Session(smollm2, system="Be terse.", params=SamplingParams(temperature=0, max_tokens=8))
    answer(session, "Hello")
    path = session.save(tmp_path / "chat.json")
    other = Session(smollm2)
    other.load(path)
    assert other.system == "Be terse." and other.messages == session.messages


@pytest.mark.parametrize("content", ["{not json", json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
                                     json.dumps([1, 2]), json.dumps({"version": 99, "messages": []})])
def test_a_bad_conversation_file_is_a_clear_error(smollm2, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(InvalidConfigError, match="bad.json"):
        Session(smollm2).load(path)


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}",
])
def test_the_template_sandbox_refuses_python_internals(template):
    render = compile_template(template)
    with pytest.raises(TemplateError):
        render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_raise_exception_in_a_template_is_a_clear_error():
    render = compile_template("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TemplateError, match="roles must alternate"):
        render(messages=[])


def test_fallback_template_is_chatml():
    render = compile_template(FALLBACK_TEMPLATE)
    text = render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_models_own_template_renders_the_conversation(smollm2):
    session = Session(smollm2, system="S")
    tokens = session.prompt_tokens([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert smollm2.detokenize(tokens).endswith("<|im_start|>assistant\n")
    im_start = smollm2.tokenize("<|im_start|>", special=True)
    assert len(im_start) == 1 and tokens[0] == im_start[0]
