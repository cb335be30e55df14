"""/v1/responses over the fake backend: the response object, the typed event stream (as the official SDK reads it),
multi-turn by previous_response_id, function calls and their outputs, and what is refused."""

from __future__ import annotations

import asyncio
import json
import time

import openai
import pytest
from fastapi.testclient import TestClient

from app import responses_api
from app.conversations import ConversationStore
from app.main import create_app
from app.settings import GatewaySettings
from tests.unit.test_gateway import REPLY, FakeBackend

ADD = {"type": "function", "name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.fixture
def backend():
    backend = FakeBackend()
    backend.context_length = 4096  # multi-turn prompts and tool listings (bytes are tokens here)
    return backend


@pytest.fixture
def client(backend):
    with TestClient(create_app(GatewaySettings(gateway_max_concurrent=4), backend=backend)) as client:
        yield client


@pytest.fixture
def sdk(client):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_a_response_object_with_text_usage_and_the_sdks_output_text(sdk, backend):
    response = sdk.responses.create(model="fake/model-1", input="hi", instructions="Be brief.")
    assert response.object == "response" and response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == REPLY
    assert response.usage.output_tokens == len(REPLY.encode()) + 1 and response.usage.input_tokens > 0
    assert backend.decode(backend.requests[-1].prompt_ids).startswith("<system>Be brief.<user>hi")


def test_max_output_tokens_makes_it_incomplete(sdk, client):
    response = sdk.responses.create(model="fake/model-1", input="hi", max_output_tokens=5)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == REPLY[:5] and response.output[0].status == "incomplete"  # the message too
    streamed = client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi", "max_output_tokens": 5,
                                                  "stream": True}).text
    events = [json.loads(line[len("data: "):]) for line in streamed.splitlines() if line.startswith("data: ")]
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [item["status"] for item in done] == ["incomplete"] and events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"


def test_the_event_stream_is_what_the_sdk_accumulates_into_the_same_response(sdk):
    kinds = []
    with sdk.responses.stream(model="fake/model-1", input="hi") as stream:
        for event in stream:
            kinds.append(event.type)
        final = stream.get_final_response()
    assert final.output_text == REPLY and final.status == "completed"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}


def test_previous_response_id_continues_the_conversation_without_its_instructions(sdk, backend):
    first = sdk.responses.create(model="fake/model-1", input="turn one", instructions="Old rules.")
    sdk.responses.create(model="fake/model-1", input="turn two", previous_response_id=first.id)
    prompt = backend.decode(backend.requests[-1].prompt_ids)
    assert prompt == f"<user>turn one<assistant>{REPLY}<user>turn two<assistant>"
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="fake/model-1", input="x", previous_response_id="resp_unknown")
    unstored = sdk.responses.create(model="fake/model-1", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="fake/model-1", input="y", previous_response_id=unstored.id)


def test_function_calls_streamed_or_not_and_their_outputs_go_back_into_the_prompt(client, sdk, backend):
    backend.reply = CALL
    response = sdk.responses.create(model="fake/model-1", input="1+2?", tools=[ADD])
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert not [item for item in response.output if item.type == "message"]
    with sdk.responses.stream(model="fake/model-1", input="1+2?", tools=[ADD]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds
    assert [(i.type, i.name, i.arguments) for i in final.output] == [(c.type, c.name, c.arguments) for c in calls]
    backend.reply = "3"
    sdk.responses.create(model="fake/model-1", previous_response_id=response.id, tools=[ADD], input=[
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "3"}])
    prompt = backend.decode(backend.requests[-1].prompt_ids)
    assert prompt.endswith(f'<assistant>{CALL}<user><tool_response>\n3\n</tool_response><assistant>')


@pytest.mark.parametrize("body, param", [
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "name": "nope"}}, None),
    ({"text": {"format": {"type": "json_schema"}}}, "text"),
    ({"temperature": 5}, "temperature"),
    ({"model": "other"}, "model"),
    ({"conversation": "conv_123"}, "conversation"),  # fields whose meaning this gateway cannot give: not ignored
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"background": True, "stream": True}, None),  # background responses are polled, not streamed
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input"),
])
def test_what_is_refused_is_a_4xx_with_the_openai_error_body(client, body, param):
    response = client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi", **body})
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["message"] and (param is None or (error["param"] or "").startswith(param)), error


def test_a_stored_response_is_retrieved_listed_and_deleted_by_its_own_key_only(sdk, client):
    """GET /v1/responses/{id} (the object as it was sent, streamed or not), its input items (newest first, as
    OpenAI's list), DELETE; another key's, an unknown or a deleted id: 404."""
    response = sdk.responses.create(model="fake/model-1", max_output_tokens=100, input=[
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    again = sdk.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    listed = sdk.responses.input_items.list(response.id)
    assert [(item.role, item.content[0].text) for item in listed.data] == [("user", "c"), ("assistant", "b"),
                                                                            ("user", "a")]
    page = client.get(f"/v1/responses/{response.id}/input_items", params={"order": "asc", "limit": 2}).json()
    assert [item["content"][0]["text"] for item in page["data"]] == ["a", "b"] and page["has_more"]
    rest = client.get(f"/v1/responses/{response.id}/input_items",
                      params={"order": "asc", "after": page["last_id"]}).json()
    assert [item["content"][0]["text"] for item in rest["data"]] == ["c"] and not rest["has_more"]
    assert client.get(f"/v1/responses/{response.id}/input_items", params={"limit": 0}).status_code == 400
    with sdk.responses.stream(model="fake/model-1", input="hi", max_output_tokens=100) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_response()
    assert sdk.responses.retrieve(streamed.id).output_text == streamed.output_text == REPLY
    assert sdk.responses.delete(response.id) is None
    for method in ("get", "delete"):
        missing = client.request(method.upper(), f"/v1/responses/{response.id}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    unstored = sdk.responses.create(model="fake/model-1", input="hi", store=False)
    assert client.get(f"/v1/responses/{unstored.id}").status_code == 404


def test_stored_responses_belong_to_their_key():
    backend = FakeBackend()
    backend.context_length = 4096
    with TestClient(create_app(GatewaySettings(gateway_api_keys="k1,k2"), backend=backend)) as client:
        made = client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi"},
                           headers={"Authorization": "Bearer k1"}).json()
        own = client.get(f"/v1/responses/{made['id']}", headers={"Authorization": "Bearer k1"})
        other = client.get(f"/v1/responses/{made['id']}", headers={"Authorization": "Bearer k2"})
        nobody = client.get(f"/v1/responses/{made['id']}")
    assert own.status_code == 200 and own.json()["id"] == made["id"]
    assert other.status_code == 404 and nobody.status_code == 401


def test_output_text_logprobs_when_included(sdk, backend):
    """include ["message.output_text.logprobs"] with top_logprobs: the text's tokens with their log-probabilities,
    in the response and in the stream's deltas (a token that is part of a character with the text that completes
    it); without it, none."""
    asked = {"include": ["message.output_text.logprobs"], "top_logprobs": 2}
    response = sdk.responses.create(model="fake/model-1", input="hi", max_output_tokens=100, **asked)
    entries = response.output[0].content[0].logprobs
    assert bytes(b for e in entries for b in e.bytes).decode() == response.output_text == REPLY
    assert all(e.logprob == -0.5 and len(e.top_logprobs) == 2 for e in entries)
    assert backend.requests[-1].logprobs == 2
    streamed = []
    with sdk.responses.stream(model="fake/model-1", input="hi", max_output_tokens=100, **asked) as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                streamed.extend(event.logprobs)
    assert bytes(b for e in streamed for b in e.bytes).decode() == REPLY
    plain = sdk.responses.create(model="fake/model-1", input="hi", max_output_tokens=100)
    assert plain.output[0].content[0].logprobs == [] and backend.requests[-1].logprobs is None


def test_a_history_replayed_from_another_run_is_taken(sdk, backend):
    """What an agent framework sends back (the Agents SDK's to_input_list() of an OpenAI run): reasoning items (left
    out: this model reads none), a function call's output as text parts; truncation "auto" is echoed."""
    response = sdk.responses.create(model="fake/model-1", tools=[ADD], truncation="auto", input=[
        {"role": "user", "content": "1+2?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "add them"}],
         "encrypted_content": "gAAAA"},
        {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": '{"a": 1, "b": 2}'},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "3"}]}])
    assert response.status == "completed" and response.truncation == "auto"
    prompt = bytes(backend.requests[-1].prompt_ids).decode()
    assert prompt.endswith(f'<assistant>{CALL}<user><tool_response>\n3\n</tool_response><assistant>')
    assert "add them" not in prompt and "gAAAA" not in prompt


def test_text_and_calls_keep_their_order_streamed_or_not(sdk, backend):
    backend.reply = f"Adding. {CALL} Done."
    whole = sdk.responses.create(model="fake/model-1", input="1+2?", tools=[ADD])
    with sdk.responses.stream(model="fake/model-1", input="1+2?", tools=[ADD]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    for response in (whole, final):
        assert [item.type for item in response.output] == ["message", "function_call", "message"]
        assert response.output[0].content[0].text == "Adding." and response.output[2].content[0].text == " Done."


def test_a_stream_that_fails_to_start_late_still_opens_with_response_created(backend):

    backend.gate = asyncio.Event()
    backend.fail_after = 0
    app = create_app(GatewaySettings(gateway_sse_keepalive=0.05), backend=backend)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = __import__("httpx").ASGITransport(app=app)
            async with __import__("httpx").AsyncClient(transport=transport, base_url="http://t") as http:
                task = asyncio.create_task(http.post("/v1/responses", json={
                    "model": "fake/model-1", "input": "hi", "stream": True}))
                await asyncio.sleep(0.3)  # past the keep-alive interval: answered 200, the start still pending
                backend.gate.set()
                return await task

    response = asyncio.run(scenario())
    kinds = [line[len("event: "):] for line in response.text.splitlines() if line.startswith("event: ")]
    assert response.status_code == 200 and ": keep-alive" in response.text
    assert kinds == ["response.created", "response.in_progress", "error", "response.failed"]


def test_required_tool_choice_without_tools_is_refused(client):
    response = client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi", "tool_choice": "required"})
    assert response.status_code == 400


def test_a_stored_response_continues_only_under_the_key_that_made_it(backend):
    """Two API keys: k2 cannot continue (nor learn of) k1's conversation by its response id, streamed or not."""
    settings = GatewaySettings(gateway_max_concurrent=4, gateway_api_keys="k1 k2")
    with TestClient(create_app(settings, backend=backend)) as client:
        one, two = (openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
                    for key in ("k1", "k2"))
        first = one.responses.create(model="fake/model-1", input="a secret")
        with one.responses.stream(model="fake/model-1", input="another") as stream:
            streamed = stream.get_final_response()
        for response_id in (first.id, streamed.id):
            with pytest.raises(openai.NotFoundError):
                two.responses.create(model="fake/model-1", input="what was said?", previous_response_id=response_id)
            one.responses.create(model="fake/model-1", input="go on", previous_response_id=response_id)
        assert backend.decode(backend.requests[-1].prompt_ids).startswith("<user>another")


def test_item_references_stand_for_the_items_of_stored_responses(sdk, client, backend, monkeypatch):
    """`item_reference` (typed, or an id alone as OpenAI's schema allows) names an input or output item of a response
    this caller stored: a message, a function call; unknown, deleted or never stored: 404; one stored item named
    over and over stops at a bound (a 400), as a body does."""
    first = sdk.responses.create(model="fake/model-1", input=[{"role": "user", "content": "turn one"}])
    asked = sdk.responses.input_items.list(first.id).data[0].id
    answered = first.output[0].id
    made = client.post("/v1/responses", json={"model": "fake/model-1", "input": [
        {"type": "item_reference", "id": asked}, {"type": None, "id": answered},
        {"role": "user", "content": "turn two"}]})
    assert made.status_code == 200, made.text
    prompt = backend.decode(backend.requests[-1].prompt_ids)
    assert prompt == f"<user>turn one<assistant>{REPLY}<user>turn two<assistant>"
    listed = sdk.responses.input_items.list(made.json()["id"], order="asc").data
    assert [(item.role, item.content[0].text) for item in listed] == [("user", "turn one"), ("assistant", REPLY),
                                                                      ("user", "turn two")]
    backend.reply = CALL
    called = sdk.responses.create(model="fake/model-1", input="1+2?", tools=[ADD])
    call = next(item for item in called.output if item.type == "function_call")
    backend.reply = "3"
    sdk.responses.create(model="fake/model-1", tools=[ADD], input=[
        {"role": "user", "content": "1+2?"}, {"type": "item_reference", "id": call.id},
        {"type": "function_call_output", "call_id": call.call_id, "output": "3"}])
    assert backend.decode(backend.requests[-1].prompt_ids).endswith(
        f'<assistant>{CALL}<user><tool_response>\n3\n</tool_response><assistant>')
    unstored = sdk.responses.create(model="fake/model-1", input="x", store=False)
    sdk.responses.delete(first.id)
    for missing in ("msg_unknown", asked, answered, unstored.output[0].id):
        refused = client.post("/v1/responses", json={"model": "fake/model-1", "input": [
            {"type": "item_reference", "id": missing}]})
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "input", refused.text
    monkeypatch.setattr(responses_api, "REFERENCED_TEXT", 3 * len(REPLY))
    backend.reply = REPLY
    again = sdk.responses.create(model="fake/model-1", input="x").output[0].id
    taken = client.post("/v1/responses", json={"model": "fake/model-1", "input": [{"id": again}] * 3})
    assert taken.status_code == 200
    refused = client.post("/v1/responses", json={"model": "fake/model-1", "input": [{"id": again}] * 4})
    assert refused.status_code == 400 and "referenced" in refused.json()["error"]["message"]


def test_an_item_reference_is_found_only_under_the_key_that_stored_it(backend):
    settings = GatewaySettings(gateway_max_concurrent=4, gateway_api_keys="k1 k2")
    with TestClient(create_app(settings, backend=backend)) as client:
        one, two = (openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)
                    for key in ("k1", "k2"))
        secret = one.responses.create(model="fake/model-1", input="a secret").output[0].id
        with pytest.raises(openai.NotFoundError):
            two.responses.create(model="fake/model-1", input=[{"type": "item_reference", "id": secret}])
        one.responses.create(model="fake/model-1", input=[{"type": "item_reference", "id": secret}])
        assert backend.decode(backend.requests[-1].prompt_ids) == f"<assistant>{REPLY}<assistant>"


def test_the_stores_index_of_items_forgets_them_with_their_response():
    store = ConversationStore(capacity=2)
    for n in range(3):
        store.put(f"resp_{n}", [], "", {"output": [{"id": f"msg_out{n}", "type": "message"}]},
                  [{"id": f"msg_in{n}", "type": "message"}])
    assert store.item("msg_out0") is None and store.item("msg_in0") is None  # pushed out by the capacity
    assert store.item("msg_out2") == {"id": "msg_out2", "type": "message"} and store.item("msg_in1") is not None
    assert store.item("msg_out2", owner="someone else") is None
    store.delete("resp_2")
    assert store.item("msg_out2") is None and set(store._holder) == {"msg_in1", "msg_out1"}


def test_a_background_response_is_answered_at_once_then_polled_to_its_end(sdk, client):
    """`background: true`: the response comes back in progress (admitted and started: what fails there is still an
    HTTP error), is computed in the gateway and polled by GET; it continues a conversation as any stored one;
    cancelling it once it has ended changes nothing; it needs store and is not streamed; only it can be cancelled."""
    started = sdk.responses.create(model="fake/model-1", input="hi", background=True)
    assert started.background and started.status in ("in_progress", "completed")
    for _ in range(200):
        polled = sdk.responses.retrieve(started.id)
        if polled.status != "in_progress":
            break
        time.sleep(0.01)
    assert polled.status == "completed" and polled.output_text == REPLY and polled.usage.output_tokens > 0
    assert sdk.responses.cancel(started.id).status == "completed"
    sdk.responses.create(model="fake/model-1", input="and?", previous_response_id=started.id)
    plain = sdk.responses.create(model="fake/model-1", input="hi")
    refused = client.post(f"/v1/responses/{plain.id}/cancel")
    assert refused.status_code == 400 and "background" in refused.json()["error"]["message"]
    assert client.post("/v1/responses/resp_unknown/cancel").status_code == 404
    for body in ({"store": False}, {"stream": True}):
        refused = client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi", "background": True,
                                                      **body})
        assert refused.status_code == 400 and refused.json()["error"]["message"], refused.text
