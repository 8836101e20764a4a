"""Constrained decoding on llama.cpp with SmolLM2 and a real prompt: JSON schemas, regex, Lark and GBNF.

The contract suite (``tests/contract/test_constraints.py``) runs the engine on all three backends
with a random model; here the model is a real one, several constrained answers share the
scheduler's steps (one llguidance call fills all their masks), and the grammar's cost is checked
structurally: an unconstrained model never builds a grammar tokenizer at all.
"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest

from edge_runtime.backends.base import Grammar, SamplingParams, Settings
from edge_runtime.backends.llamacpp.model import LlamaCppModel
from edge_runtime.errors import InvalidRequestError

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
            "required": ["city", "country"],
            "additionalProperties": False,
        },
        "role": {"enum": ["student", "teacher", "engineer"]},
    },
    "required": ["name", "age", "hobbies", "address", "role"],
    "additionalProperties": False,
}


def chat(model: LlamaCppModel, question: str) -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return model.tokenize(text, special=True)


def answer(model: LlamaCppModel, prompt: list[int], params: SamplingParams) -> tuple[str, str | None]:
    events = list(model.generate(prompt, params))
    return "".join(e.text for e in events), events[-1].finish_reason


@pytest.fixture(scope="module")
def parallel_smollm2(smollm2_path: Path):
    """SmolLM2 with four slots: constrained answers decoded side by side."""
    with LlamaCppModel(str(smollm2_path), Settings(n_ctx=2048, n_threads=2, n_parallel=4)) as model:
        yield model


def test_an_unconstrained_model_builds_no_grammar_machinery(parallel_smollm2):
    model = parallel_smollm2
    prompt = chat(model, "Say hello.")
    answer(model, prompt, SamplingParams(max_tokens=4, temperature=0.0, logprobs=1))
    assert not model.grammars.tokenizer_built
    assert model.scheduler is not None and model.scheduler._masks is None


def test_json_schema_answers_decoded_together_all_validate(parallel_smollm2):
    model = parallel_smollm2
    prompt = chat(model, "Describe a person as JSON: name, age, hobbies, address (city, country) and role.")

    def one(seed: int) -> tuple[str, str | None]:
        params = SamplingParams(max_tokens=160, temperature=0.7, seed=seed, json_schema=PERSON)
        return answer(model, prompt, params)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert model.grammars.tokenizer_built
    stopped = [text for text, reason in results if reason == "stop"]
    assert len(stopped) >= 3, results
    for text in stopped:
        jsonschema.validate(json.loads(text), PERSON)


def test_a_regex_a_lark_and_a_gbnf_grammar_shape_the_answer(smollm2):
    prompt = chat(smollm2, "What is the phone number of the office?")
    phone, reason = answer(smollm2, prompt, SamplingParams(
        max_tokens=30, temperature=0.0, grammar=Grammar("regex", r"\(\d{3}\) \d{3}-\d{4}")))
    assert reason == "stop" and len(phone) == 14 and phone[0] == "(" and phone[9] == "-", phone

    prompt = chat(smollm2, "Is the sky blue? Answer yes or no, then give a short reason.")
    lark = 'start: ("yes" | "no") ", because " REASON "."\nREASON: /[a-z ]{1,40}/'
    text, reason = answer(smollm2, prompt, SamplingParams(max_tokens=60, temperature=0.0, grammar=lark))
    assert reason == "stop" and text.split(",")[0] in ("yes", "no") and text.endswith("."), text

    prompt = chat(smollm2, "Order a drink.")
    gbnf = 'root ::= "I want " size " " drink\nsize ::= "small" | "large"\ndrink ::= "tea" | "coffee"'
    text, reason = answer(smollm2, prompt, SamplingParams(max_tokens=20, temperature=0.0,
                                                          grammar=Grammar("gbnf", gbnf)))
    assert reason == "stop" and text in {f"I want {s} {d}" for s in ("small", "large") for d in ("tea", "coffee")}


def test_a_lark_grammar_may_embed_a_json_schema(smollm2):
    prompt = chat(smollm2, "Give the answer as JSON with a key 'answer' holding a number: what is 2 + 2?")
    lark = 'start: "Answer: " obj\nobj: %json {"type": "object", "properties": {"answer": {"type": "integer"}}, ' \
           '"required": ["answer"], "additionalProperties": false}'
    text, reason = answer(smollm2, prompt, SamplingParams(max_tokens=40, temperature=0.0, grammar=lark))
    assert reason == "stop" and text.startswith("Answer: ")
    assert isinstance(json.loads(text[len("Answer: "):])["answer"], int)


@pytest.mark.parametrize(("params", "message"), [
    (lambda: SamplingParams(grammar=Grammar("gbnf", "root ::= missing")), "GBNF"),
    (lambda: SamplingParams(grammar=Grammar("regex", "(unclosed")), "regex"),
    (lambda: SamplingParams(grammar="start: %json {not json}"), "Lark"),
    (lambda: SamplingParams(json_schema={"type": "object", "properties": {"a": {"$ref": "#/missing"}}}),
     "json_schema"),
])
def test_a_grammar_llguidance_refuses_is_a_request_error_before_any_work(smollm2, params, message):
    prompt = chat(smollm2, "Hello.")
    evaluated = smollm2.evaluated_total
    with pytest.raises(InvalidRequestError, match=message) as info:
        smollm2.generate(prompt, params())
    assert "\n" not in info.value.message
    assert smollm2.evaluated_total == evaluated  # nothing was decoded


def test_json_object_mode_gives_an_object_and_compact_whitespace_can_be_asked_for(smollm2):
    prompt = chat(smollm2, "Give me a JSON object about a cat.")
    text, reason = answer(smollm2, prompt, SamplingParams(max_tokens=120, temperature=0.0,
                                                          json_schema={"type": "object"}))
    if reason == "stop":
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{")
    compact = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}},
               "required": ["name"], "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    text, reason = answer(smollm2, prompt, SamplingParams(max_tokens=40, temperature=0.0, json_schema=compact))
    assert reason == "stop", text
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)  # not one blank


def test_closing_the_model_drops_the_grammar_tokenizer(smollm2_path):
    model = LlamaCppModel(str(smollm2_path), Settings(n_ctx=256, n_threads=2))
    prompt = chat(model, "Pick a colour.")
    text, reason = answer(model, prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                        grammar=Grammar("regex", "(red|green|blue)")))
    assert reason == "stop" and text in ("red", "green", "blue")
    assert model.grammars.tokenizer_built
    model.close()
    assert not model.grammars.tokenizer_built  # it points into the vocabulary just freed


def test_edgert_run_json_schema_answers_in_the_schema_and_a_bad_file_is_one_line(edgert_cmd, tmp_path):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "broken.json").write_text('{"type": ')
    (tmp_path / "list.json").write_text("[]")
    res = subprocess.run([*edgert_cmd, "run", "What colour is the sky? Answer in JSON.", "--chat", "--temp", "0",
                          "--threads", "2", "--max-tokens", "40", "--json", "--json-schema",
                          str(tmp_path / "schema.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), schema)
    for name in ("broken.json", "list.json", "missing.json"):
        res = subprocess.run([*edgert_cmd, "chat", "--json-schema", str(tmp_path / name)], input="hi\n",
                             capture_output=True, text=True, timeout=120)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and lines[0].startswith(f"error: {tmp_path / name}"), res.stderr
        assert len(lines) <= 2 and "Traceback" not in res.stderr
