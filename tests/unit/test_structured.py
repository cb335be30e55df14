"""Structured outputs and tool calls without a model: the grammars a request gets (checked with llguidance against
SmolLM2's real tokenizer: what they accept and refuse), the constraint's masks, the prompt, and the tool-call reader
(streamed in every split of the text)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from app.protocol.requests import ChatCompletionRequest
from app.structured import ToolCallReader, grammar_for, template_messages
from swarm.client.grammar import GrammarError, Grammars
from swarm.client.requests import Grammar
from swarm.model.source import resolve_model
from swarm_kernels.sampling import Sampler, SamplingParams

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"],
    "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}

NOW = {"type": "function", "function": {"name": "now", "description": "The time now"}}
ANY = {"type": "function", "function": {"name": "any", "parameters": {}}}


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model().path)


@pytest.fixture(scope="module")
def grammars(tokenizer):
    return Grammars(tokenizer, len(tokenizer), tokenizer.eos_token_id)


def accepts(grammars, tokenizer, grammar: Grammar, text: str) -> bool:
    """Whether the grammar takes `text` (as the tokenizer splits it) and may end after it."""
    matcher = grammars.matcher(grammar)
    ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
    return ok and matcher.is_accepting()


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.mark.parametrize("fields, text, accepted", [
    ({"response_format": {"type": "json_object"}}, '{"a": [1, 2], "b": {"c": null}}', True),
    ({"response_format": {"type": "json_object"}}, '```json\n{"a": 1}\n```', False),  # nothing around the object
    ({"response_format": {"type": "json_object"}}, '[1, 2]', False),
    ({"tools": [ADD, WEATHER], "tool_choice": "required"}, CALL, True),
    ({"tools": [ADD, WEATHER], "tool_choice": "required"}, f"{CALL}\n{WEATHER_CALL}", True),
    ({"tools": [ADD, WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, f"{CALL}\n{WEATHER_CALL}",
     False),
    ({"tools": [ADD, WEATHER], "tool_choice": "required"}, "The answer is 3.", False),
    ({"tools": [ADD, WEATHER], "tool_choice": "required"},  # arguments must validate against the parameters
     '<tool_call>\n{"name": "add", "arguments": {"a": "one", "b": 2}}\n</tool_call>', False),
    ({"tools": [ADD, WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     CALL, False),
    ({"tools": [ADD, WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     WEATHER_CALL, True),
    ({"tools": [ADD], "response_format": {"type": "json_object"}}, CALL, True),  # auto + format: a call...
    ({"tools": [ADD], "response_format": {"type": "json_object"}}, '{"sum": 3}', True),  # ...or the JSON
    ({"tools": [ADD], "response_format": {"type": "json_object"}}, "3", False),
    ({"tools": [NOW], "tool_choice": "required"}, '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>', True),
    ({"tools": [NOW], "tool_choice": "required"},  # no parameters: no arguments (OpenAI's empty parameter list)
     '<tool_call>\n{"name": "now", "arguments": {"time": "noon"}}\n</tool_call>', False),
    ({"tools": [ANY], "tool_choice": "required"},  # an empty schema: any object of arguments
     '<tool_call>\n{"name": "any", "arguments": {"time": "noon"}}\n</tool_call>', True),
    ({"tools": [ANY], "tool_choice": "required"}, '<tool_call>\n{"name": "any", "arguments": "noon"}\n</tool_call>',
     False),
])
def test_the_grammar_of_a_request_accepts_what_it_asked_for_and_nothing_else(grammars, tokenizer, fields, text,
                                                                              accepted):
    grammar = grammar_for(request(**fields))
    assert grammar is not None
    assert accepts(grammars, tokenizer, grammar, text) is accepted


def test_free_text_requests_get_no_grammar():
    assert grammar_for(request()) is None
    assert grammar_for(request(tools=[ADD])) is None  # auto without a format: the model chooses, in free text
    assert grammar_for(request(tools=[ADD], tool_choice="none")) is None
    assert grammar_for(request(response_format={"type": "text"})) is None


@pytest.mark.parametrize("schema, feature", [
    ({"type": "string", "format": "no-such-format"}, "format"),
    ({"type": "object", "properties": {"x": {"$ref": "#/definitions/missing"}}}, "missing"),
    ({"type": "unknown-type"}, "unknown-type"),
])
def test_a_schema_feature_that_cannot_be_enforced_is_refused_naming_it(grammars, schema, feature):
    grammar = grammar_for(request(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}))
    with pytest.raises(GrammarError, match=feature):
        grammars.check(grammar)


def test_masks_follow_each_row_and_a_complete_grammar_allows_only_end_of_text(grammars, tokenizer):
    constraint = grammars.constraint(Grammar("json_schema", json.dumps({"enum": ["yes", "no"]})), 2)
    logits = torch.zeros(2, len(tokenizer))
    allowed = constraint.apply(logits) > float("-inf")
    assert 0 < int(allowed[0].sum()) < 10 and torch.equal(allowed[0], allowed[1])
    yes, no = (tokenizer.encode(text, add_special_tokens=False) for text in ('"yes"', '"no"'))
    for a, b in zip(yes[:2], no[:2], strict=True):  # row 0 writes '"yes', row 1 '"no'
        constraint.advance(torch.tensor([a, b]))
    allowed = constraint.apply(logits) > float("-inf")
    assert allowed[0, yes[2]] and allowed[1, no[2]]  # each may close its own string...
    assert not allowed[:, tokenizer.eos_token_id].any()  # ...and neither may end before it has
    constraint.advance(torch.tensor([yes[2], no[2]]))
    allowed = constraint.apply(logits) > float("-inf")
    assert [row.nonzero().flatten().tolist() for row in allowed] == [[tokenizer.eos_token_id]] * 2


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_constrained_sampler_never_picks_a_token_the_grammar_refuses(grammars, tokenizer, temperature):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    for seed in range(5):
        constraint = grammars.constraint(Grammar("json_schema", json.dumps(schema)), 1)
        sampler = Sampler(1, len(tokenizer), SamplingParams(temperature, seed=seed), logprobs=2,
                          constraint=constraint)
        generator = torch.Generator().manual_seed(seed)
        tokens = []
        for _ in range(40):
            choice = sampler(torch.randn(1, len(tokenizer), generator=generator) * 5)
            token = int(choice.token_ids[0])
            assert choice.logprobs is not None and float(choice.logprobs[0]) > -9999.0
            if token == tokenizer.eos_token_id:
                break
            tokens.append(token)
        value = json.loads(tokenizer.decode(tokens))
        assert set(value) == {"n"} and 0 <= value["n"] <= 99


def test_tools_go_into_a_system_message_when_the_template_has_no_tool_format():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4"}, {"role": "user", "content": "Thanks"}]
    with_tools = ChatCompletionRequest(model="m", messages=messages, tools=[ADD])
    rendered, tools = template_messages(with_tools, native_tools=False)
    assert tools is None
    assert rendered[0]["role"] == "system" and rendered[0]["content"].startswith("Be brief.")
    assert '"name": "add"' in rendered[0]["content"] and "<tool_call>" in rendered[0]["content"]
    assert rendered[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2, '
                                                           '"b": 2}}\n</tool_call>'}
    # the tool's answer becomes a user turn, merged with the next one (templates that insist on alternation)
    assert rendered[3] == {"role": "user", "content": "<tool_response>\n4\n</tool_response>\n\nThanks"}
    assert len(rendered) == 4
    native, tools = template_messages(with_tools, native_tools=True)
    assert tools == [ADD] and native[2]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 2}
    assert native[3] == {"role": "tool", "content": "4", "tool_call_id": "call_1"}


def test_strict_closes_the_objects_that_do_not_say_and_only_schemas():
    """A Pydantic model's schema (nested model in $defs, a list of them, an optional field as anyOf, a property
    named like a keyword): under strict every object schema with properties takes no other keys; what says so
    itself, maps of names and values that are not schemas are left as they were; the request's own is not changed."""
    from pydantic import BaseModel

    from app.structured import closed

    class Place(BaseModel):
        city: str
        properties: dict[str, int]  # a field named like the keyword: a free map, left open

    class Trip(BaseModel):
        places: list[Place]
        note: str | None = None
        extra: dict = {"properties": {"a": {}}}  # a default value: not a schema

    schema = Trip.model_json_schema()
    strict = closed(schema)
    assert strict["additionalProperties"] is False and strict["$defs"]["Place"]["additionalProperties"] is False
    assert "additionalProperties" not in schema and "additionalProperties" not in schema["$defs"]["Place"]
    place = strict["$defs"]["Place"]["properties"]
    assert place["properties"] == schema["$defs"]["Place"]["properties"]["properties"]  # a map of ints: as it was
    assert "additionalProperties" not in strict["properties"]  # the map of the fields is no schema
    assert strict["properties"]["extra"] == schema["properties"]["extra"]
    nested = closed({"anyOf": [{"type": "object", "properties": {"a": {"type": "object", "properties": {}}}},
                               {"type": "object", "additionalProperties": True, "properties": {}}]})
    assert nested["anyOf"][0]["additionalProperties"] is False
    assert nested["anyOf"][0]["properties"]["a"]["additionalProperties"] is False
    assert nested["anyOf"][1]["additionalProperties"] is True  # said by the schema: kept
    deep: dict = {"type": "object", "properties": {}}
    for _ in range(5000):  # deeper than the stack: no recursion
        deep = {"type": "object", "properties": {"x": deep}}
    assert closed(deep)["additionalProperties"] is False


def test_strict_formats_and_tools_take_no_other_keys(grammars, tokenizer):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"]}
    extra = '{"city": "Paris", "date": "today"}'
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}
    assert accepts(grammars, tokenizer, grammar_for(request(**fmt)), extra)  # not strict: as the schema says
    fmt["response_format"]["json_schema"]["strict"] = True
    assert not accepts(grammars, tokenizer, grammar_for(request(**fmt)), extra)
    assert accepts(grammars, tokenizer, grammar_for(request(**fmt)), '{"city": "Paris"}')
    tool = {"type": "function", "function": {"name": "w", "parameters": schema, "strict": True}}
    call = '<tool_call>\n{"name": "w", "arguments": %s}\n</tool_call>'
    forced = grammar_for(request(tools=[tool], tool_choice="required"))
    assert not accepts(grammars, tokenizer, forced, call % extra)
    assert accepts(grammars, tokenizer, forced, call % '{"city": "Paris"}')


def test_responses_function_tools_are_strict_unless_they_say_not():
    from app.protocol.responses_api import ResponsesRequest
    from app.responses_api import chat_request

    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = chat_request(ResponsesRequest(model="m", input="hi", tools=[
        {"type": "function", "name": "a", "parameters": schema},
        {"type": "function", "name": "b", "parameters": schema, "strict": False}]), []).tools
    assert [t.function.strict for t in tools] == [True, False]


TEXT = f"Let me add.\n{CALL}\n{WEATHER_CALL}\n"


@pytest.mark.parametrize("cut", range(0, len(TEXT) + 1, 3))
def test_the_reader_finds_the_calls_however_the_text_is_split(cut):
    reader = ToolCallReader({"add", "get_weather"})
    content, calls = "", []
    for piece in (TEXT[:cut], TEXT[cut:]):
        text, found = reader.feed(piece)
        content, calls = content + text, calls + found
        assert "<" not in text  # nothing of a call's markup leaks into the content
    content += reader.finish()
    assert content == "Let me add."  # the space before a call is not content, however the text was split
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2}),
                                                                   ("get_weather", {"city": "Paris"})]
    assert len({c.id for c in calls}) == 2


def test_the_reader_leaves_text_that_is_not_a_call_of_these_tools():
    reader = ToolCallReader({"add"})
    unknown = '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'
    content, calls = reader.feed(f"a < b and {unknown} and <tool_call> unclosed")
    assert calls == [] and content + reader.finish() == f"a < b and {unknown} and <tool_call> unclosed"


def test_a_repeated_call_ends_the_answer_and_is_returned_once():
    reader = ToolCallReader({"add"})
    content, calls = reader.feed(f"{CALL}\n{CALL}\n{CALL}")
    assert len(calls) == 1 and reader.ended and content == ""
    assert reader.finish() == ""


def test_without_parallel_calls_the_first_call_ends_the_answer():
    """parallel_tool_calls: false in auto mode (no grammar there): the reader ends the answer at its first call."""
    content, calls = ToolCallReader({"add", "get_weather"}, single=True).feed(f"Both.\n{CALL}\n{WEATHER_CALL}\nmore")
    assert [c.name for c in calls] == ["add"] and content == "Both."
    several = ToolCallReader({"add", "get_weather"})
    assert [c.name for c in several.feed(f"{CALL}\n{WEATHER_CALL}")[1]] == ["add", "get_weather"]
    assert not several.ended


@pytest.mark.parametrize("text, forced, call", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', frozenset(), ("get_weather", '{"city": "Pa')),
    ('<tool_call>\n{"name": "add"', frozenset(), ("add", "")),
    ('<tool_call>\n{"name": "get_we', frozenset({"get_weather"}), ("get_weather", "")),  # forced: the name's start
    ('<tool_call>\n{"na', frozenset({"get_weather"}), ("get_weather", "")),
    ('<tool_call>\n{"name": "get_we', frozenset(), None),  # not forced: the cut text is only text
    ('<tool_call>\n{"name": "a', frozenset({"add", "any"}), None),  # either of two
    ('<tool_call>\n{"name": "rm_rf", "arguments": {', frozenset(), None),  # not one of the tools
    ('<tool_call>\n{"name": "add\\u00', frozenset({"add"}), None),  # an escape cut short
    ('<tool_call>\nnot json', frozenset({"add"}), None),
    ('<tool_call>\n', frozenset({"add"}), ("add", "")),
    ('<tool_call>\n{"na', frozenset({"add", "any"}), None),
    ('<tool_call>\n{"nm', frozenset({"add"}), None),  # not the start of '{"name"'
    ('<tool_', frozenset({"add"}), ("add", "")),  # cut in the opening tag, one tool forced
    ('<tool_', frozenset({"add", "any"}), None),
])
def test_a_call_cut_by_the_token_limit_is_returned_as_far_as_it_got(text, forced, call):
    reader = ToolCallReader({"add", "any", "get_weather"}, forced=forced)
    assert reader.feed(text) == ("", [])
    cut = reader.truncated()
    assert (cut and (cut.name, cut.arguments)) == call
    assert reader.finish() == ("" if call or forced else text)  # a call's text is not content; nor forced markup
    if cut is not None:
        assert cut.truncated and cut.index == 0


def test_a_cut_call_is_its_arguments_only_and_a_cut_repeat_or_tag_is_no_call():
    whole = ToolCallReader({"add"})  # whole JSON, only the closing tag cut: the call, whole
    assert whole.feed(CALL[:-3]) == ("", [])
    call = whole.truncated()
    assert call is not None and (call.name, call.arguments, call.truncated) == ("add", '{"a": 1, "b": 2}', False)
    unclosed = ToolCallReader({"add", "get_weather"})  # a call never closed, then another: the first one
    unclosed.feed(f"{CALL[:-len('</tool_call>')]}{WEATHER_CALL[:30]}")
    call = unclosed.truncated()
    assert call is not None and (call.name, call.arguments) == ("add", '{"a": 1, "b": 2}')
    nested = ToolCallReader({"add"})  # arguments whole, the call's own brace missing
    nested.feed('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2} ')
    call = nested.truncated()
    assert call is not None and call.arguments == '{"a": 1, "b": 2}'
    repeat = ToolCallReader({"add"}, forced=frozenset({"add"}))  # the start of a repeat: the answer ends, no call
    assert len(repeat.feed(f"{CALL}\n{CALL[:40]}")[1]) == 1
    assert repeat.truncated() is None and repeat.ended and repeat.finish() == ""
    second = ToolCallReader({"add", "get_weather"}, forced=frozenset({"add", "get_weather"}))
    second.feed(f"{CALL}\n<too")  # a second call cut in its tag: neither a call nor content
    assert second.truncated() is None and second.finish() == ""


def test_a_forced_call_cut_by_max_tokens_comes_back_as_a_call_with_finish_reason_length():
    """OpenAI returns a tool call cut by max_tokens with its arguments truncated (not the markup as text), in a
    stream and not, and the Responses API an incomplete function_call item."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend, sse_events

    backend = FakeBackend(reply=f"Sure.\n{CALL}\n{WEATHER_CALL}")
    backend.context_length = 4096
    cut = len(f"Sure.\n{CALL}\n") + len('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "?"}], "tools": [ADD, WEATHER],
            "max_tokens": cut}
    with TestClient(create_app(GatewaySettings(), backend=backend)) as client:
        whole = client.post("/v1/chat/completions", json={**body, "tool_choice": "required"}).json()["choices"][0]
        events = sse_events(client.post("/v1/chat/completions", json={**body, "tool_choice": "required",
                                                                       "stream": True}))
        auto = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        response = client.post("/v1/responses", json={"model": "fake/model-1", "input": "?", "tools": [
            {"type": "function", **t["function"]} for t in (ADD, WEATHER)], "max_output_tokens": cut}).json()
    for choice in (whole, auto):
        assert choice["finish_reason"] == "length" and choice["message"]["content"] == "Sure."
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"]["tool_calls"]] == [
            ("add", '{"a": 1, "b": 2}'), ("get_weather", '{"ci')]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"])
            for d in deltas for c in d["delta"].get("tool_calls", [])] == [
        (0, "add", '{"a": 1, "b": 2}'), (1, "get_weather", '{"ci')]
    assert deltas[-1]["finish_reason"] == "length"
    assert response["status"] == "incomplete"
    calls = [item for item in response["output"] if item["type"] == "function_call"]
    assert [(c["name"], c["arguments"], c["status"]) for c in calls] == [
        ("add", '{"a": 1, "b": 2}', "completed"), ("get_weather", '{"ci', "incomplete")]


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_an_answer_cut_in_a_repeat_of_its_call_is_that_call_with_finish_reason_tool_calls(choice):
    """A small model forced to call writes the call, then again word for word: cut by max_tokens in the repeat, the
    answer is the one call, whole ("tool_calls"; the Responses API: completed), as OpenAI's would be (the SDKs'
    parse() and the Agents SDK refuse an answer that says "length")."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend

    backend = FakeBackend(reply=f"{WEATHER_CALL}\n{WEATHER_CALL}")
    backend.context_length = 4096
    cuts = [len(WEATHER_CALL) + k for k in (3, 30)]  # in the repeat's opening tag, in its arguments
    with TestClient(create_app(GatewaySettings(), backend=backend)) as client:
        for cut in cuts:
            chat = client.post("/v1/chat/completions", json={
                "model": "fake/model-1", "messages": [{"role": "user", "content": "?"}], "tools": [ADD, WEATHER],
                "tool_choice": choice, "max_tokens": cut}).json()["choices"][0]
            assert chat["finish_reason"] == "tool_calls" and chat["message"]["content"] is None
            assert [(c["function"]["name"], c["function"]["arguments"]) for c in chat["message"]["tool_calls"]] == [
                ("get_weather", '{"city": "Paris"}')]
            response = client.post("/v1/responses", json={
                "model": "fake/model-1", "input": "?", "tool_choice": choice, "max_output_tokens": cut,
                "tools": [{"type": "function", **t["function"]} for t in (ADD, WEATHER)]}).json()
            assert response["status"] == "completed"
            assert [(item["type"], item["status"]) for item in response["output"]] == [("function_call", "completed")]


def test_a_named_tool_cut_in_its_name_is_that_tool_only_when_forced():
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend

    backend = FakeBackend(reply=WEATHER_CALL)
    backend.context_length = 4096
    cut = len('<tool_call>\n{"name": "get_we')
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "?"}], "tools": [ADD, WEATHER],
            "max_tokens": cut}
    with TestClient(create_app(GatewaySettings(), backend=backend)) as client:
        named = client.post("/v1/chat/completions", json={**body, "tool_choice": {
            "type": "function", "function": {"name": "get_weather"}}}).json()["choices"][0]
        auto = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert named["finish_reason"] == "length" and named["message"]["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in named["message"]["tool_calls"]] == [
        ("get_weather", "")]
    assert auto["message"]["content"] == WEATHER_CALL[:cut] and "tool_calls" not in auto["message"]  # text


CALLS_REPLY = f"Sure.\n{CALL}\n{CALL}\nnever read"


def test_the_gateway_returns_calls_streamed_or_not_with_finish_reason_tool_calls():
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend, sse_events

    backend = FakeBackend(reply=CALLS_REPLY)
    backend.context_length = 4096  # the tools' listing is in the prompt (bytes are tokens here)
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "1+2?"}], "tools": [ADD]}
    with TestClient(create_app(GatewaySettings(), backend=backend)) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}))
        plain = client.post("/v1/chat/completions", json={**body, "tools": None}).json()["choices"][0]
        backend.reply = f"Both.\n{CALL}\n{WEATHER_CALL}\nmore"
        single = client.post("/v1/chat/completions", json={**body, "tools": [ADD, WEATHER],
                                                           "parallel_tool_calls": False}).json()["choices"][0]
    assert single["finish_reason"] == "tool_calls" and single["message"]["content"] == "Both."
    assert [c["function"]["name"] for c in single["message"]["tool_calls"]] == ["add"]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["message"]["tool_calls"]] \
        == [("add", {"a": 1, "b": 2})]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    streamed_calls = [c for d in deltas for c in d["delta"].get("tool_calls", [])]
    assert [(c["index"], c["function"]["name"]) for c in streamed_calls] == [(0, "add")]
    assert "".join(d["delta"].get("content") or "" for d in deltas) == "Sure."
    assert deltas[-1]["finish_reason"] == "tool_calls"
    assert plain["message"]["content"] == CALLS_REPLY and "tool_calls" not in plain["message"]  # no tools: text


def test_the_legacy_functions_api_is_honoured():
    """`functions` / `function_call` (deprecated by OpenAI, still honoured there): the functions are the tools, the
    answer's one call is the message's `function_call` with finish_reason "function_call", streamed or not; earlier
    turns' `function_call` and `function` messages go into the prompt as tool turns; mixing both APIs is a 400."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend, sse_events

    backend = FakeBackend(reply=f"{CALL}\n{WEATHER_CALL}")
    backend.context_length = 4096
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "1+2?"}],
            "functions": [ADD["function"], WEATHER["function"]]}
    with TestClient(create_app(GatewaySettings(), backend=backend)) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        events = sse_events(client.post("/v1/chat/completions", json={**body, "stream": True}))
        named = client.post("/v1/chat/completions", json={**body, "function_call": {"name": "add"}})
        forced = backend.requests[-1].grammar
        history = client.post("/v1/chat/completions", json={**body, "messages": [
            {"role": "user", "content": "1+2?"},
            {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
            {"role": "function", "name": "add", "content": "3"}]})
        prompt = bytes(backend.requests[-1].prompt_ids).decode()
        refused = [client.post("/v1/chat/completions", json={**body, **extra}) for extra in (
            {"tools": [ADD]}, {"functions": None, "function_call": "auto"}, {"function_call": {"name": "nope"}})]
    assert whole["finish_reason"] == "function_call" and whole["message"]["content"] is None
    assert whole["message"]["function_call"] == {"name": "add", "arguments": '{"a": 1, "b": 2}'}
    assert "tool_calls" not in whole["message"]
    deltas = [e["choices"][0] for e in events if e["choices"]]
    assert [d["delta"]["function_call"]["name"] for d in deltas if "function_call" in d["delta"]] == ["add"]
    assert deltas[-1]["finish_reason"] == "function_call" and not any("tool_calls" in d["delta"] for d in deltas)
    assert named.status_code == 200 and forced is not None and "get_weather" not in forced.source
    assert history.status_code == 200
    assert prompt.endswith(f"<user>1+2?<assistant>{CALL}<user><tool_response>\n3\n</tool_response><assistant>")
    assert [r.status_code for r in refused] == [400, 400, 400]


def test_hostile_tool_inputs_are_400s_not_500s():
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend

    backend = FakeBackend()
    backend.context_length = 1 << 20
    deep = "[" * 100_000  # json.loads raises RecursionError on it, not ValueError
    bodies = [
        {"tools": [ADD], "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
            "x-guidance": "not an object"}}}},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "add", "arguments": deep}}]},
            {"role": "tool", "tool_call_id": "c", "content": "3"}], "tools": [ADD]},
    ]
    with TestClient(create_app(GatewaySettings(), backend=backend), raise_server_exceptions=False) as client:
        for body in bodies:
            response = client.post("/v1/chat/completions", json={
                "model": "fake/model-1", "messages": [{"role": "user", "content": "x"}], **body})
            assert response.status_code in (200, 400), response.text
        assert client.post("/v1/completions", json={"model": "fake/model-1", "prompt": [-1, 5],
                                                    "echo": True}).status_code == 400
