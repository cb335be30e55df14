"""Property-based HTTP fuzz of the gateway over the scripted fake backends: whatever body a client sends to
/v1/chat/completions, /v1/completions, /v1/responses or /v1/embeddings (well-formed requests with hostile values,
arbitrary JSON, arbitrary bytes), the answer is never a 5xx, every error has the OpenAI error body, no example takes
more than its deadline, and nothing is left held afterwards (slots, queue places, backend generations).

Bodies are built from each endpoint's fields, each either a plausible value or any JSON value (NaN, huge integers,
lone surrogates included), plus unknown fields. Derandomized, so that the default test run is deterministic; run
with `--hypothesis-seed=random`-style exploration by editing SETTINGS when hunting.

Run: .venv/bin/python -m pytest tests/unit/test_gateway_fuzz.py
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.main import create_app
from app.settings import GatewaySettings
from tests.unit.test_gateway import FakeBackend
from tests.unit.test_gateway_shapes import FakeEmbeddings

SETTINGS = settings(max_examples=250, deadline=2000, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# any JSON value, including what strict JSON has not: NaN, infinities, lone surrogates, integers past 64 bits
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def either(plausible: st.SearchStrategy) -> st.SearchStrategy:
    return plausible | anything


numbers = st.integers(-3, 300) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(
    [0, 1, 2**63, 2**64, -(2**63) - 1, 1e-300, 5e-324, -0.0])
texts = st.text(max_size=30) | st.sampled_from(["\ud800", "a\udfffb", "STOP", "²", "--5", "\x00", "é" * 8])
token_ids = st.integers(-2, 300) | st.sampled_from([2**31, 2**63, 10**30, -(2**63)])
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "robot", ""])
parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": either(texts)}),
                 max_size=3)
message = st.fixed_dictionaries({"role": either(roles)}, optional={"content": either(texts | parts | st.none()),
                                                                   "name": texts})
model = st.just("fake/model-1") | either(st.sampled_from(["other", ""]))  # mostly the served one
sampling = {
    "max_tokens": either(numbers), "temperature": either(numbers), "top_p": either(numbers), "n": either(numbers),
    "stream": either(st.booleans()),
    "stream_options": either(st.fixed_dictionaries({"include_usage": either(st.booleans())})),
    "stop": either(texts | st.lists(texts, max_size=6)), "seed": either(numbers),
    "presence_penalty": either(numbers), "frequency_penalty": either(numbers),
    "logit_bias": either(st.dictionaries(texts | token_ids.map(str), numbers, max_size=4)),
    "logprobs": either(st.booleans() | numbers), "user": anything,
}
schemas = st.sampled_from([{}, {"type": "object"}, {"type": "unenforceable"}, {"enum": [1, "a"]}]) | anything
function = st.fixed_dictionaries({"name": either(st.sampled_from(["add", "get_weather", "no spaces", ""]))},
                                 optional={"parameters": schemas, "description": texts})
tools = st.lists(st.fixed_dictionaries({"type": either(st.just("function")), "function": either(function)}),
                 max_size=3)
tool_choices = st.sampled_from(["none", "auto", "required", "x"]) | st.fixed_dictionaries(
    {"type": either(st.just("function")), "function": st.fixed_dictionaries({"name": either(texts)})})
tool_call = st.fixed_dictionaries({"id": either(texts), "type": either(st.just("function")),
                                   "function": st.fixed_dictionaries({"name": either(texts),
                                                                      "arguments": either(texts)})})
message = message | st.fixed_dictionaries({"role": st.just("assistant"), "tool_calls": either(st.lists(
    tool_call, max_size=2))}) | st.fixed_dictionaries({"role": st.just("tool"), "content": either(texts),
                                                       "tool_call_id": either(texts)})
chat_bodies = st.fixed_dictionaries({"model": model, "messages": either(st.lists(message, max_size=4))},
                                    optional={**sampling, "max_completion_tokens": either(numbers),
                                              "top_logprobs": either(numbers),
                                              "response_format": either(st.fixed_dictionaries(
                                                  {"type": st.sampled_from(["text", "json_object", "json_schema",
                                                                            "x"])},
                                                  optional={"json_schema": st.fixed_dictionaries(
                                                      {"name": either(texts), "schema": schemas})})),
                                              "tools": either(tools), "tool_choice": either(tool_choices),
                                              "parallel_tool_calls": anything})
input_items = st.lists(message | st.fixed_dictionaries(
    {"type": st.sampled_from(["function_call", "function_call_output", "message", "web_search_call"]),
     "call_id": either(texts), "name": either(texts), "arguments": either(texts), "output": either(texts)}),
    max_size=4)
response_bodies = st.fixed_dictionaries({"model": model, "input": either(texts | input_items)}, optional={
    "instructions": either(texts), "max_output_tokens": either(numbers), "temperature": either(numbers),
    "top_p": either(numbers), "stream": either(st.booleans()), "store": anything,
    "previous_response_id": either(texts),
    "text": either(st.fixed_dictionaries({"format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema"])},
        optional={"name": either(texts), "schema": schemas})})),
    "tools": either(st.lists(st.fixed_dictionaries({"type": either(st.sampled_from(["function", "web_search"])),
                                                    "name": either(texts)}, optional={"parameters": schemas}),
                             max_size=3)),
    "tool_choice": either(st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
        {"type": st.just("function"), "name": either(texts)}))})
prompts = texts | st.lists(texts, max_size=4) | st.lists(token_ids, max_size=6) | st.lists(
    st.lists(token_ids, max_size=4), max_size=3)
text_bodies = st.fixed_dictionaries({"model": model, "prompt": either(prompts)},
                                    optional={**sampling, "echo": anything})
embedding_bodies = st.fixed_dictionaries(
    {"model": either(st.sampled_from(["fake/embedder", "fake/model-1"])), "input": either(prompts)},
    optional={"encoding_format": either(st.sampled_from(["float", "base64", "hex"])), "dimensions": either(numbers)})
PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions", "embeddings": "/v1/embeddings",
         "responses": "/v1/responses"}


@pytest.fixture(scope="module")
def gateway():
    backend = FakeBackend(reply="ok, fuzzed. STOP")
    app = create_app(GatewaySettings(gateway_max_concurrent=2, gateway_queue_timeout=1.0), backend=backend,
                     embeddings=FakeEmbeddings())
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, app, backend
        engine = app.state.engine
        assert (engine.active, engine.admission.queued, backend.open_sessions) == (0, 0, 0), "something leaked"


def check(response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text


def post(client: TestClient, path: str, body) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    check(client.post(path, content=content, headers={"content-type": "application/json"}))


@SETTINGS
@given(body=chat_bodies)
def test_chat_completions_never_answer_5xx(gateway, body):
    post(gateway[0], PATHS["chat"], body)


@SETTINGS
@given(body=text_bodies)
def test_completions_never_answer_5xx(gateway, body):
    post(gateway[0], PATHS["text"], body)


@SETTINGS
@given(body=embedding_bodies)
def test_embeddings_never_answer_5xx(gateway, body):
    post(gateway[0], PATHS["embeddings"], body)


@SETTINGS
@given(body=response_bodies)
def test_responses_never_answer_5xx(gateway, body):
    post(gateway[0], PATHS["responses"], body)


@settings(SETTINGS, max_examples=100)
@given(path=st.sampled_from(list(PATHS.values())), body=st.binary(max_size=64) | anything)
def test_any_bytes_or_json_value_never_get_5xx(gateway, path, body):
    post(gateway[0], path, body)
