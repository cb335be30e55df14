"""Structured outputs and tool calls through `uvicorn app.main:app` (its embedded SmolLM2 swarm), driven by the
official `openai` SDK: what the grammar enforces holds on every answer, at temperature 1 over many seeds too."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.e2e.test_gateway import MODEL, free_port
from tests.launcher import LocalSwarm

SEEDS = range(6)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("structured")) as swarm:
        port = free_port()
        swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": "", "GATEWAY_MAX_CONCURRENT": "32"})
        swarm.url = f"http://127.0.0.1:{port}"
        yield swarm


@pytest.fixture(scope="module")
def sdk(gateway):
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=300)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


class City(BaseModel):
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    # multipleOf bounds the digits: unbounded, SmolLM2 writes 31.2188888... to the token limit (valid, but endless)
    population_millions: float = Field(ge=0, le=100, multiple_of=0.1)


async def test_parse_returns_the_pydantic_object(sdk):
    completion = await sdk.chat.completions.parse(model=MODEL, messages=user("Describe Paris as JSON."),
                                                  response_format=City, temperature=0, max_tokens=200)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    assert isinstance(choice.message.parsed, City)


async def test_json_object_is_one_object_and_nothing_around_it(sdk):
    completions = await asyncio.gather(*(sdk.chat.completions.create(
        model=MODEL, messages=user("Give me a JSON object describing a cat."), seed=seed, temperature=1,
        max_tokens=100, response_format={"type": "json_object"}) for seed in SEEDS[:4]))
    for completion in completions:
        text = completion.choices[0].message.content
        if completion.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict), text
        else:  # cut by max_tokens: still an object's beginning, never a code fence
            assert text.startswith("{"), text


SCHEMAS = {
    "nested object with required and optional": {
        "type": "object", "additionalProperties": False, "required": ["name", "address"],
        "properties": {"name": {"type": "string", "maxLength": 20}, "nickname": {"type": "string", "maxLength": 10},
                       "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                   "properties": {"city": {"type": "string", "maxLength": 20},
                                                  "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}},
    "array of enums": {
        "type": "object", "additionalProperties": False, "required": ["colors"],
        "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 4,
                                  "items": {"enum": ["red", "green", "blue"]}}}},
    "bounded numbers": {
        "type": "object", "additionalProperties": False, "required": ["age", "score", "ok"],
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "score": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
                       "ok": {"type": "boolean"}}},
    "patterned strings and anyOf": {
        "type": "object", "additionalProperties": False, "required": ["id", "value"],
        "properties": {"id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                       "value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                           {"type": "string", "enum": ["none"]}]}}},
}


@pytest.mark.parametrize("name", list(SCHEMAS))
async def test_json_schema_answers_validate_at_temperature_one_over_many_seeds(sdk, name):
    schema = SCHEMAS[name]

    async def one(seed: int):  # two choices each: one grammar state per row
        return await sdk.chat.completions.create(
            model=MODEL, messages=user("Fill in this record with made-up values."), seed=seed, temperature=1,
            max_tokens=150, n=2, response_format={"type": "json_schema", "json_schema": {
                "name": "record", "schema": schema, "strict": True}})

    seeds = SEEDS[:4]
    choices = [c for completion in await asyncio.gather(*(one(seed) for seed in seeds)) for c in completion.choices]
    assert len(choices) == 2 * len(seeds)
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content  # the schema bounds every answer's length
        jsonschema.validate(json.loads(choice.message.content), schema)
    assert len({c.message.content for c in choices}) > 1  # sampled, not one forced answer


async def test_a_schema_that_cannot_be_enforced_is_a_400_naming_the_feature(sdk):
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": {
                "type": "object", "properties": {"when": {"type": "string", "format": "not-a-format"}}}}})
    assert "format" in str(info.value) and info.value.body["param"] == "response_format"


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather of a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30}}}}}
QUESTION = user("What is the weather in Paris?")


def check_calls(calls, tools=(WEATHER, TIME)):
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
async def test_forced_tool_calls_are_calls_with_valid_arguments(sdk, choice):
    completions = await asyncio.gather(*(sdk.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], tool_choice=choice, seed=seed, temperature=1,
        max_tokens=100, parallel_tool_calls=False) for seed in SEEDS[:4]))
    for completion in completions:
        choice_ = completion.choices[0]
        assert choice_.finish_reason == "tool_calls", choice_
        assert choice_.message.content is None and len(choice_.message.tool_calls) == 1
        check_calls(choice_.message.tool_calls)
        if isinstance(choice, dict):
            assert choice_.message.tool_calls[0].function.name == "get_weather"


async def test_streamed_tool_calls_accumulate_as_the_sdk_does_and_equal_the_unstreamed_answer(sdk):
    kwargs = dict(model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
                  max_tokens=100, parallel_tool_calls=False)  # one call: its length is bounded by the schema

    async def streamed_answer():
        async with sdk.chat.completions.stream(**kwargs) as stream:
            async for _ in stream:
                pass
            return (await stream.get_final_completion()).choices[0]

    whole, streamed = await asyncio.gather(sdk.chat.completions.create(**kwargs), streamed_answer())
    whole = whole.choices[0]
    assert streamed.finish_reason == whole.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in streamed.message.tool_calls] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls]
    assert not streamed.message.content


async def test_a_whole_tool_round_trip(sdk):
    first = (await sdk.chat.completions.create(model=MODEL, messages=QUESTION, tools=[WEATHER],
                                               tool_choice="required", temperature=0, max_tokens=100)).choices[0]
    call = first.message.tool_calls[0]
    messages = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    final = (await sdk.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                               temperature=0, max_tokens=40)).choices[0]
    assert final.message.content and not final.message.tool_calls
    assert final.finish_reason in ("stop", "length")


@pytest.mark.slow  # reading calls out of free text is covered over the fake backend (tests/unit/test_structured.py)
async def test_auto_lets_the_model_choose_and_reads_what_it_wrote(sdk):
    completions = await asyncio.gather(*(sdk.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=[WEATHER, TIME], seed=seed, temperature=1, max_tokens=60)
        for seed in SEEDS[:4]))
    for completion in completions:
        choice = completion.choices[0]
        if choice.message.tool_calls:
            check_calls(choice.message.tool_calls)
            assert choice.finish_reason in ("tool_calls", "length")
        else:
            assert choice.message.content and "<tool_call>" not in choice.message.content.split("</tool_call>")[-1]


# ---- the Responses API ---------------------------------------------------------------------------------------------
async def test_responses_with_a_schema_streamed_and_not(sdk):
    schema = SCHEMAS["array of enums"]
    kwargs = dict(model=MODEL, input="Pick some colors.", temperature=0, max_output_tokens=60,
                  text={"format": {"type": "json_schema", "name": "colors", "schema": schema, "strict": True}})

    async def streamed():
        async with sdk.responses.stream(**kwargs) as stream:
            async for _ in stream:
                pass
            return await stream.get_final_response()

    whole, final = await asyncio.gather(sdk.responses.create(**kwargs), streamed())
    assert whole.status == final.status == "completed"
    jsonschema.validate(json.loads(whole.output_text), schema)
    assert final.output_text == whole.output_text


async def test_responses_multi_turn_reuses_the_first_turns_tokens_and_calls_tools(sdk):
    first = await sdk.responses.create(model=MODEL, input="Name a fruit.", temperature=0, max_output_tokens=12)
    second = await sdk.responses.create(model=MODEL, input="And a vegetable?", previous_response_id=first.id,
                                        temperature=0, max_output_tokens=12)
    assert second.output_text
    # the second prompt begins with the first turn (its input and answer): the parked session holds those tokens
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
    tools = [{"type": "function", **WEATHER["function"]}]
    call = await sdk.responses.create(model=MODEL, input="What is the weather in Paris?", tools=tools,
                                      tool_choice="required", parallel_tool_calls=False, temperature=0,
                                      max_output_tokens=100)
    items = [item for item in call.output if item.type == "function_call"]
    assert len(items) == 1 and items[0].name == "get_weather"
    jsonschema.validate(json.loads(items[0].arguments), WEATHER["function"]["parameters"])
    answer = await sdk.responses.create(model=MODEL, previous_response_id=call.id, tools=tools, tool_choice="none",
                                        temperature=0, max_output_tokens=30, input=[
                                            {"type": "function_call_output", "call_id": items[0].call_id,
                                             "output": json.dumps({"temperature": 18})}])
    assert answer.output_text and not [i for i in answer.output if i.type == "function_call"]


async def test_a_background_response_is_the_answer_at_once_and_a_cancelled_one_gives_its_slot_back(sdk, gateway):
    """background: polled to the same greedy answer as the request answered at once; another cancelled while the
    swarm computes it (its slot and the peers' session given back: no generation left active); an item of the first
    referenced in a new request."""
    kwargs = dict(model=MODEL, input="Count from one to ten in words.", temperature=0, max_output_tokens=24)
    at_once = await sdk.responses.create(**kwargs)
    started = await sdk.responses.create(background=True, **kwargs)
    assert started.background and started.status == "in_progress"
    polled = started
    for _ in range(1200):
        polled = await sdk.responses.retrieve(started.id)
        if polled.status != "in_progress":
            break
        await asyncio.sleep(0.05)
    assert polled.status == at_once.status and polled.output_text == at_once.output_text
    long = await sdk.responses.create(background=True, model=MODEL, input="Write a long story about a dragon.",
                                      temperature=0, max_output_tokens=400)
    await asyncio.sleep(0.5)
    cancelled = await sdk.responses.cancel(long.id)
    assert cancelled.status == "cancelled" and cancelled.output[0].status == "incomplete"
    assert (await sdk.responses.retrieve(long.id)).status == "cancelled"
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"{gateway.url}/metrics")).text
    assert "swarm_gateway_active_generations 0.0" in metrics
    follow = await sdk.responses.create(model=MODEL, temperature=0, max_output_tokens=12, input=[
        {"type": "item_reference", "id": at_once.output[0].id}, {"role": "user", "content": "And then?"}])
    assert follow.status in ("completed", "incomplete") and follow.output_text
    assert follow.usage.input_tokens > at_once.usage.input_tokens  # the referenced answer is in its prompt
