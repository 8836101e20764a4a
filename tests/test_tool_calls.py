"""Tool calls end to end: SmolLM2 (whose template takes no tools, so the fallback prompt) behind the
real server, driven by the openai client; and the reader that takes calls out of an answer's text."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from test_server_safety import serving, smollm2_loader

from edge_runtime.server.requests import Answer, Tool, ToolUse
from edge_runtime.server.state import ServerConfig
from edge_runtime.server.tool_calls import ToolCallReader
from edge_runtime.server.tools import template_takes_tools, tool_grammar
from edge_runtime.session import FALLBACK_TEMPLATE


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


class Clock(BaseModel):
    model_config = ConfigDict(extra="forbid")
    timezone: str = Field(max_length=24)


TOOLS = [openai.pydantic_function_tool(Weather, name="get_weather", description="The weather in a city"),
         openai.pydantic_function_tool(Clock, name="get_time", description="The time in a timezone")]
ARGUMENTS = {"get_weather": Weather, "get_time": Clock}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def server(smollm2_path):
    config = ServerConfig(model_id="smollm2", parallel=4, queue_size=32)
    with serving(config, smollm2_loader(smollm2_path, n_ctx=1024, n_parallel=4)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=600)


def _valid(call) -> None:
    """The call names a tool and its arguments validate against that tool's parameters."""
    assert call.type == "function" and call.id.startswith("call_")
    ARGUMENTS[call.function.name].model_validate_json(call.function.arguments)


def test_required_always_gives_a_valid_call(client):
    def one(seed: int):
        return client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=80)

    with ThreadPoolExecutor(4) as pool:  # the server's four slots decode together
        replies = list(pool.map(one, range(20)))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        _valid(choice.message.tool_calls[0])


def test_a_named_function_is_the_one_called(client):
    reply = client.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in calls] == ["get_time"]
    _valid(calls[0])


def test_a_streamed_call_reassembles_into_the_whole_one(server, client):
    kw = {"model": "default", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "temperature": 0,
          "max_tokens": 80}
    whole = client.chat.completions.create(**kw).choices[0]
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == whole.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    # On the wire: id, type and name once per call, in its first delta; the arguments in pieces.
    deltas = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json={**kw, "stream": True}, timeout=600) as res:
        for line in res.iter_lines():
            if line.startswith("data: {"):
                deltas += json.loads(line[6:])["choices"][0]["delta"].get("tool_calls") or []
    firsts = [d for d in deltas if "id" in d]
    assert [d["index"] for d in firsts] == list(range(len(whole.message.tool_calls)))
    assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in deltas
               if "id" not in d)
    assert len(deltas) > len(firsts) + 1  # the arguments came in more than one piece


def test_a_history_with_tool_results_continues(client):
    first = client.chat.completions.create(model="default", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=80)
    message = first.choices[0].message  # sent back as the SDK sends it, every key it got included
    results = [{"role": "tool", "tool_call_id": c.id, "content": "18 degrees and sunny"}
               for c in message.tool_calls]
    reply = client.chat.completions.create(model="default", messages=[*ASK, message, *results], tools=TOOLS,
                                           temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_tool_choice_without_tools_and_unknown_functions_are_refused(server):
    for body, param in [({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
                         "tool_choice"),
                        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
                        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools")]:
        res = httpx.post(f"{server}/v1/chat/completions", json={"messages": ASK, "max_tokens": 2, **body}, timeout=60)
        assert res.status_code == 400 and res.json()["error"]["param"] == param, res.text


# -- the reader and the grammar, on their own ------------------------------------------------------

USE = ToolUse(tuple(Tool(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS))
TWO_CALLS = ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Pa\\"ris {", "unit": "celsius"}}, '
             '{"name": "get_time", "arguments": {"timezone": "UTC"}}]</tool_call>')


def _read(text: str, step: int, *, incremental: bool) -> Answer:
    ids = iter(range(100))
    reader = ToolCallReader(USE, lambda: f"call_{next(ids)}", incremental=incremental)
    answer = Answer()
    for i in range(0, len(text), step):
        for piece in reader.push(text[i:i + step]):
            answer.add(piece)
    for piece in reader.finish():
        answer.add(piece)
    return answer


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_calls_read_the_same_however_the_text_arrives(step, incremental):
    answer = _read(TWO_CALLS, step, incremental=incremental)
    assert answer.text == ""
    assert [(c.id, c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
        ("call_0", "get_weather", {"city": 'Pa"ris {', "unit": "celsius"}),
        ("call_1", "get_time", {"timezone": "UTC"})]


@pytest.mark.parametrize("incremental", [True, False])
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_the_end_marker_spelled_inside_an_argument_does_not_end_the_call(step, incremental):
    # SmolLM2 under the grammar once wrote a city holding "}}]</tool_call>": the call was cut there.
    city = ',)}}]</tool_call> 23:7 m\\"</tool_call>'
    text = ('<tool_call>[{"name": "get_weather", "arguments": {"city": ' + json.dumps(city)
            + ', "unit": "celsius"}}]</tool_call>')
    answer = _read(text, step, incremental=incremental)
    assert answer.text == ""
    assert [(c.name, json.loads(c.arguments)) for c in answer.tool_calls] == [
        ("get_weather", {"city": city, "unit": "celsius"})]


@pytest.mark.parametrize("text", ['<tool_call>[{"name": "launch", "arguments": {}}]</tool_call>',
                                  '<tool_call>{"name": "get_time", "arguments": [1]}</tool_call>',
                                  "<tool_call>not json</tool_call>", "a < b, and <tool_c is no call"])
def test_what_is_no_call_of_a_known_tool_stays_text(text):
    answer = _read(text, 3, incremental=False)
    assert answer.text == text and answer.tool_calls == []


def test_text_before_a_call_and_hermes_blocks_are_read():
    text = 'Let me look.\n<tool_call>\n{"name": "get_time", "arguments": {"timezone": "UTC"}}\n</tool_call>\n'
    answer = _read(text + text.split("\n", 1)[1], 4, incremental=False)
    assert answer.text == "Let me look."
    assert [c.name for c in answer.tool_calls] == ["get_time", "get_time"]


def test_the_grammar_nests_each_tools_definitions_under_its_name():
    defs = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Place"}},
            "$defs": {"Place": {"type": "object", "properties": {"near": {"$ref": "#/$defs/Place"}}}}}
    grammar = tool_grammar(ToolUse((Tool("find", None, defs),), "required"), native=False)
    assert '"#/$defs/find__Place"' in grammar and '"#/$defs/Place"' not in grammar
    assert tool_grammar(ToolUse((Tool("find", None, defs),), "auto"), native=False) is None


def test_templates_that_take_tools_are_told_apart():
    assert not template_takes_tools(FALLBACK_TEMPLATE)
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages[0]['content'] }}")


# -- a template that takes tools (Hermes style), on the real model -----------------------------------

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these functions:\n{% for t in tools %}{{ t | tojson }}\n"
    "{% endfor %}Call one as <tool_call>\n{\"name\": ..., \"arguments\": ...}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n{{ c['function'] | tojson }}\n</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_takes_tools_renders_them_and_its_calls_follow_the_grammar(smollm2):
    from edge_runtime.backends.base import SamplingParams
    from edge_runtime.server.requests import Message, ToolCall
    from edge_runtime.server.tools import template_messages
    from edge_runtime.session import ChatFormatter

    assert template_takes_tools(HERMES_TEMPLATE)
    history = (Message("user", "Time in Tokyo?"),
               Message("assistant", "", (ToolCall("call_1", "get_time", '{"timezone": "Asia/Tokyo"}'),)),
               Message("tool", "09:00", tool_call_id="call_1"), Message("user", "And in Paris?"))
    formatter = ChatFormatter(smollm2, HERMES_TEMPLATE)
    tokens = formatter.tokens(template_messages(history), tools=[t.to_dict() for t in USE.tools])
    prompt = smollm2.detokenize(tokens)
    assert '"name": "get_weather"' in prompt and '"timezone": "Asia/Tokyo"' in prompt and "09:00" in prompt
    named = ToolUse(USE.tools, "function", "get_time")
    params = SamplingParams(max_tokens=60, temperature=0, grammar=tool_grammar(named, native=True))
    reader = ToolCallReader(named, lambda: "call_x", incremental=True)
    answer = Answer()
    for event in smollm2.generate(tokens, params):
        for piece in reader.push(event.text) + (reader.finish() if event.finish_reason else []):
            answer.add(piece)
        finish = event.finish_reason
    assert finish == "stop" and [c.name for c in answer.tool_calls] == ["get_time"]
    Clock.model_validate_json(answer.tool_calls[0].arguments)
