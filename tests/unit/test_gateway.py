"""The gateway's HTTP behaviour over a scripted fake backend (no swarm): shapes, streaming, stops, errors, auth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import pytest
from fastapi.testclient import TestClient

from app.detokenize import ChoiceText
from app.main import create_app
from app.settings import GatewaySettings
from swarm.client.requests import GenerationRequest, TokenEvent
from swarm.protocol import ErrorCode, PeerError

EOS = 0
REPLY = "Hello, wörld — ünïcode 🤖 ok. STOP after stop."


class FakeBackend:
    """Bytes are tokens (so multi-byte characters span several tokens); the reply is scripted."""

    model_id = "fake/model-1"
    context_length = 256
    vocab_size = 256
    eos_token_ids = (EOS,)

    def __init__(self, reply: str = REPLY):
        self.reply = reply
        self.missing: list[tuple[int, int]] = []
        self.requests: list[GenerationRequest] = []
        self.fail_after: int | None = None
        self.refuse: Exception | None = None
        self.open_sessions = 0
        self.gate: asyncio.Event | None = None
        self.cached = 0  # prompt tokens the first step says a reused session held

    async def missing_blocks(self):
        return self.missing

    native_tools = False
    chats = True

    def encode_chat(self, messages, tools=None):
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def check_grammar(self, grammar):  # the real check is llguidance's (tests/e2e/test_structured.py)
        if "unenforceable" in grammar.source:
            raise ValueError("'unenforceable' is not a feature this fake enforces")

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i != EOS).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return self.decode([token_id])

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id == EOS else bytes([token_id])

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        if self.refuse:
            raise self.refuse
        script = [*self.encode(self.reply), EOS]
        self.open_sessions += 1
        try:
            for step in range(min(request.max_new_tokens, len(script))):
                if self.gate is not None:
                    await self.gate.wait()
                if self.fail_after is not None and step >= self.fail_after:
                    raise PeerError("peer died", ErrorCode.INTERNAL)
                token = script[step]
                prompt = None
                if request.prompt_logprobs is not None and step == 0:  # the prompt's tokens: -1 each, as scripted
                    prompt = tuple((None if j == 0 else -1.0, ((t, -1.0),) * request.prompt_logprobs)
                                   for j, t in enumerate(request.prompt_ids))
                yield [TokenEvent(i, token, -0.5 if request.logprobs is not None else None,
                                  [(token, -0.5)] * (request.logprobs or 0), stop=token == EOS,
                                  cached_prompt_tokens=self.cached if step == 0 else 0, prompt_logprobs=prompt)
                       for i in range(request.n)]
                if token == EOS:
                    return
        finally:
            self.open_sessions -= 1


@pytest.fixture
def backend():
    return FakeBackend()


@pytest.fixture
def client(backend):
    with TestClient(create_app(GatewaySettings(gateway_max_concurrent=4), backend=backend)) as client:
        yield client


def chat(client, **overrides):
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}], **overrides}
    return client.post("/v1/chat/completions", json=body)


def sse_events(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_chat_completion_shape_and_exact_usage(client):
    body = chat(client).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": REPLY}, "logprobs": None,
                                "finish_reason": "stop"}]
    prompt = len(b"<user>hi<assistant>")
    completion = len(REPLY.encode()) + 1  # + the eos token
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion, "prompt_tokens_details": {"cached_tokens": 0},
                             "completion_tokens_details": {"accepted_prediction_tokens": 0,
                                                           "rejected_prediction_tokens": 0}}


def test_streamed_deltas_concatenate_to_the_full_text_and_never_split_characters(client):
    events = sse_events(chat(client, stream=True))
    ids = {e["id"] for e in events}
    assert len(ids) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(contents) == REPLY
    assert all("\ufffd" not in c for c in contents)
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and "usage" not in events[-1]


def test_include_usage_sends_a_final_usage_chunk(client):
    events = sse_events(chat(client, stream=True, stream_options={"include_usage": True}))
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == len(REPLY.encode()) + 1
    assert all(e["usage"] is None for e in events[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_cached_prompt_tokens_are_reported_once_per_prompt(client, backend, stream):
    def usage(response):
        return sse_events(response)[-1]["usage"] if stream else response.json()["usage"]

    options = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    backend.cached = 5
    assert usage(chat(client, **options))["prompt_tokens_details"] == {"cached_tokens": 5}
    # n choices share their prompt: counted once, as prompt_tokens is; two prompts are two jobs, each cached
    assert usage(chat(client, n=3, **options))["prompt_tokens_details"] == {"cached_tokens": 5}
    texts = client.post("/v1/completions", json={"model": "fake/model-1", "prompt": ["abcdefg", "hijklmnop"], "n": 2,
                                                 "max_tokens": 2, **options})
    assert usage(texts)["prompt_tokens_details"] == {"cached_tokens": 10}
    backend.cached = 10**6  # a backend claiming more than the prompt: never more than the prompt is reported
    reported = usage(chat(client, **options))
    cached = reported["prompt_tokens_details"]["cached_tokens"]
    assert cached == reported["prompt_tokens"] == len(b"<user>hi<assistant>")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_cut_and_never_emitted(client, stream):
    response = chat(client, stop=["STOP", "nothing"], stream=stream)
    text = ("".join(e["choices"][0]["delta"].get("content", "") for e in sse_events(response)) if stream
            else response.json()["choices"][0]["message"]["content"])
    assert text == REPLY[: REPLY.index("STOP")]


class DraftingBackend(FakeBackend):
    """The reply "abcdefgh" + EOS in speculative steps: the first token alone, then a step that drafted 6 tokens and
    kept them all (positions 1..6: drafts, their `unused_drafts` the drafts after them), then "h" alone, then EOS."""

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        script = [*self.encode("abcdefgh"), EOS]
        events = [TokenEvent(0, script[0])]
        events += [TokenEvent(0, script[p], kept_draft=True, unused_drafts=6 - p) for p in range(1, 7)]
        events += [TokenEvent(0, script[7]), TokenEvent(0, script[8], stop=True)]
        for event in events[: request.max_new_tokens]:
            yield [event]
            if event.stop:
                return


@pytest.mark.parametrize("stream", [False, True])
def test_drafts_computed_past_a_stop_string_are_counted_rejected(stream):
    with TestClient(create_app(GatewaySettings(), backend=DraftingBackend())) as client:
        response = chat(client, stop=["d"], stream=stream, stream_options={"include_usage": True} if stream else None)
        usage = sse_events(response)[-1]["usage"] if stream else response.json()["usage"]
        full = chat(client).json()["usage"]
    # "d" is the third draft: drafts b, c, d are in the completion (d's text cut), e, f, g were computed for nothing
    assert usage["completion_tokens"] == 4
    assert usage["completion_tokens_details"] == {"accepted_prediction_tokens": 3, "rejected_prediction_tokens": 3}
    assert full["completion_tokens_details"] == {"accepted_prediction_tokens": 6, "rejected_prediction_tokens": 0}


def test_streaming_holds_back_a_partial_stop_match():
    text = ChoiceText(lambda ids: bytes(ids).decode("utf-8", errors="replace"), ["abc"])
    assert text.add(ord("x")) == "x"
    assert text.add(ord("a")) == ""  # could be the start of "abc"
    assert text.add(ord("b")) == ""
    assert text.add(ord("z")) == "abz"  # it was not
    assert text.add(ord("a")) + text.add(ord("b")) + text.add(ord("c")) == "" and text.stopped


def test_max_tokens_gives_length_and_n_gives_choices(client):
    body = chat(client, max_tokens=5, n=2).json()
    assert [c["message"]["content"] for c in body["choices"]] == [REPLY[:5]] * 2
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["usage"]["completion_tokens"] == 10
    assert chat(client, max_completion_tokens=3).json()["choices"][0]["message"]["content"] == REPLY[:3]


def test_sampling_parameters_reach_the_backend(client, backend):
    chat(client, temperature=0.7, top_p=0.9, seed=7, presence_penalty=0.5, frequency_penalty=0.25,
         logit_bias={"42": -100}, response_format={"type": "json_object"}, user="u1", metadata={"x": 1})
    request = backend.requests[-1]
    assert (request.temperature, request.top_p, request.seed) == (0.7, 0.9, 7)
    assert (request.presence_penalty, request.frequency_penalty, request.logit_bias) == (0.5, 0.25, {42: -100})
    assert request.max_new_tokens == FakeBackend.context_length - len(request.prompt_ids)


def test_every_answer_carries_a_request_id(client):
    """Refusals and errors too (as OpenAI's), so that a client's report can be found; a generation's is its own."""
    refused = client.post("/v1/chat/completions", json={"model": "fake/model-1"})
    missing = client.get("/v1/models/nope")
    answered = chat(client, max_tokens=2)
    assert refused.status_code == 400 and len(refused.headers["x-request-id"]) == 16
    assert missing.status_code == 404 and missing.headers["x-request-id"] != refused.headers["x-request-id"]
    assert len(answered.headers.get_list("x-request-id")) == 1


def test_logprobs_are_returned(client):
    body = chat(client, logprobs=True, top_logprobs=2, max_tokens=3).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert [c["token"] for c in content] == ["H", "e", "l"] and content[0]["logprob"] == -0.5
    assert len(content[0]["top_logprobs"]) == 2
    # an answer that ends by itself: one entry per token of its text, none for the end token (as OpenAI's)
    whole = chat(client, logprobs=True).json()["choices"][0]
    assert whole["finish_reason"] == "stop"
    assert bytes(b for c in whole["logprobs"]["content"] for b in c["bytes"]).decode() == REPLY  # one per byte here
    assert whole["message"]["content"] == REPLY
    events = sse_events(client.post("/v1/chat/completions", json={
        "model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "stream": True}))
    streamed = [e["choices"][0] for e in events if e["choices"]]
    assert bytes(b for d in streamed for c in (d["logprobs"] or {}).get("content") or [] for b in c["bytes"]
                 ).decode() == REPLY
    legacy = client.post("/v1/completions", json={"model": "fake/model-1", "prompt": "hi", "logprobs": 0,
                                                 "max_tokens": 100}).json()
    assert len(legacy["choices"][0]["logprobs"]["tokens"]) == len(REPLY.encode()) and legacy["choices"][0][
        "text"] == REPLY
    # each token's text_offset is where its character begins in the text (here a token per byte: an emoji's four
    # tokens all begin where it does)
    assert legacy["choices"][0]["logprobs"]["text_offset"] == [i for i, c in enumerate(REPLY) for _ in c.encode()]


def test_message_forms_clients_send_are_accepted(client, backend):
    messages = [{"role": "developer", "content": "be brief"}, {"role": "system", "content": "sys", "name": "x"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b",
                                                                              "cache_control": {}}]},
                {"role": "assistant", "content": None}, {"role": "tool", "content": "42", "tool_call_id": "t"}]
    assert chat(client, messages=messages).status_code == 200
    assert backend.decode(backend.requests[-1].prompt_ids).startswith("<system>be brief<system>sys<user>ab")


def test_legacy_completions_with_a_list_of_prompts(client):
    body = client.post("/v1/completions", json={"model": "fake/model-1", "prompt": ["a", "b"], "max_tokens": 4,
                                                "n": 2}).json()
    assert body["object"] == "text_completion"
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(i, REPLY[:4]) for i in range(4)]
    events = sse_events(client.post("/v1/completions", json={"model": "fake/model-1", "prompt": "a", "max_tokens": 100,
                                                             "stream": True}))
    assert "".join(e["choices"][0]["text"] for e in events) == REPLY


BAD_REQUESTS = {
    "no messages": {"messages": []},
    "bad role": {"messages": [{"role": "robot", "content": "x"}]},
    "image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "temperature": {"temperature": 3},
    "top_p zero": {"top_p": 0},
    "n zero": {"n": 0},
    "n too big": {"n": 100},
    "max_tokens zero": {"max_tokens": 0},
    "max_tokens string": {"max_tokens": "ten"},
    "too many stops": {"stop": ["a", "b", "c", "d", "e"]},
    "empty stop": {"stop": [""]},
    "long stop": {"stop": ["x" * 257]},
    "penalty": {"presence_penalty": 5},
    "logit_bias key": {"logit_bias": {"hello": 1}},
    "logit_bias value": {"logit_bias": {"5": 500}},
    "top_logprobs without logprobs": {"top_logprobs": 3},
    "top_logprobs too many": {"logprobs": True, "top_logprobs": 50},
    "over the context": {"max_tokens": 250},
    "missing model": {"model": ""},
    "user message without content": {"messages": [{"role": "user"}]},
    "user message with null content": {"messages": [{"role": "user", "content": None}]},
    "audio part": {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
    "stream_options without stream": {"stream_options": {"include_usage": True}},
    "tool_choice without tools": {"tool_choice": "required"},
    "tool_choice naming no tool": {"tools": [{"type": "function", "function": {"name": "f"}}],
                                   "tool_choice": {"type": "function", "function": {"name": "g"}}},
    "two tools of one name": {"tools": [{"type": "function", "function": {"name": "f"}}] * 2},
    "bad function name": {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
    "json_schema without its schema": {"response_format": {"type": "json_schema"}},
    "schema the backend cannot enforce": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "unenforceable"}}}},
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_400_with_the_openai_error_object(client, name):
    response = chat(client, **BAD_REQUESTS[name])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and set(error) == {"message", "type",
                                                                                           "param", "code"}
    assert chat(client).status_code == 200  # and the next request is served


@pytest.mark.parametrize(("path", "body", "param", "words"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages.0.content.0", "parts of type 'image_url' are not supported"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content",
     "a valid string, or a valid list"),
    ("/v1/chat/completions", {"top_logprobs": 2}, None, "top_logprobs requires logprobs"),
    ("/v1/responses", {"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input.0", "'web_search_call'"),
    ("/v1/responses", {"input": [{"type": "reasoning"}]}, "input", "no message or function call output"),
    ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input.0.content.0", "parts of type 'input_image' are not supported"),
    ("/v1/responses", {"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "should be 'user'"),
    ("/v1/completions", {"prompt": {}}, "prompt", "a valid string, or a valid list"),
])
def test_a_refused_field_is_named_with_the_reason_not_a_union_branchs(client, path, body, param, words):
    """A union's branches all fail for a value of the wrong kind: the client reads the check that says why (an image
    part is not supported), at the field's own name, not "<field>.str: Input should be a valid string"."""
    base = {"/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}, "/v1/responses": {"input": "hi"},
            "/v1/completions": {"prompt": "hi"}}[path]
    response = client.post(path, json={"model": "fake/model-1", **base, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and "Value error" not in error["message"], error
    assert ".str" not in error["message"] and "[" not in (error["param"] or ""), error


@pytest.mark.parametrize("stream", [False, True])
def test_completions_echo_the_prompt_with_its_logprobs_and_text_offsets(client, stream):
    body = {"model": "fake/model-1", "prompt": "Say: ", "max_tokens": 5, "echo": True, "logprobs": 1, "n": 2,
            "stream": stream}
    response = client.post("/v1/completions", json=body)
    if stream:
        choices = [c for e in sse_events(response) for c in e["choices"] if c["index"] == 1]
        text = "".join(c["text"] for c in choices)
        logprobs = {key: [x for c in choices if c["logprobs"] for x in c["logprobs"][key]]
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        choice = response.json()["choices"][1]
        text, logprobs = choice["text"], choice["logprobs"]
    assert text == "Say: " + REPLY[:5]
    assert logprobs["tokens"] == list("Say: ") + list(REPLY[:5])
    assert logprobs["token_logprobs"] == [None] + [-1.0] * 4 + [-0.5] * 5
    assert logprobs["top_logprobs"][0] is None and logprobs["top_logprobs"][1] == {"a": -1.0}
    assert logprobs["text_offset"] == list(range(10))  # one character per token here
    plain = client.post("/v1/completions", json={**body, "logprobs": None, "stream": False}).json()["choices"][0]
    assert plain["text"] == "Say: " + REPLY[:5] and plain["logprobs"] is None


def test_the_context_check_names_the_limit_the_client_sent_and_models_have_a_created_time(client):
    """(The fake's context is 256 tokens.)"""
    for field in ("max_tokens", "max_completion_tokens"):
        error = chat(client, **{field: 250}).json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == field and field in error["message"]
    error = client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi", "max_output_tokens": 250,
                                               "store": False}).json()["error"]
    assert error["param"] == "max_output_tokens" and "max_output_tokens (250)" in error["message"], error
    assert client.get("/v1/models").json()["data"][0]["created"] > 1_700_000_000


def test_legacy_top_logprobs_always_hold_the_chosen_token():
    """OpenAI: "the API will always return the logprob of the sampled token, so there may be up to logprobs+1
    elements" (a sampled token outside the top ones, and logprobs: 0)."""
    from app.protocol.responses import CompletionLogprobs, TokenLogprob, TopLogprob

    def top(token, logprob):
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    entries = [TokenLogprob(token="P", logprob=None, bytes=[80], top_logprobs=[]),
               TokenLogprob(token=" unto", logprob=-17.9, bytes=[], top_logprobs=[top(".", -0.4)]),
               TokenLogprob(token=" Paris", logprob=-0.3, bytes=[], top_logprobs=[top(" Paris", -0.3)]),
               TokenLogprob(token="!", logprob=-2.0, bytes=[], top_logprobs=[])]
    assert CompletionLogprobs.of(entries).top_logprobs == [None, {".": -0.4, " unto": -17.9}, {" Paris": -0.3},
                                                           {"!": -2.0}]


def test_explicit_nulls_mean_absent(client, backend):
    response = chat(client, top_p=None, temperature=None, n=None, stop=None, max_tokens=None, seed=None,
                    logprobs=None, stream=None, stream_options=None, response_format=None, tools=None,
                    tool_choice=None, presence_penalty=None, logit_bias=None)
    assert response.status_code == 200, response.text
    request = backend.requests[-1]
    assert (request.top_p, request.temperature, request.n, request.grammar) == (1.0, 1.0, 1, None)


def test_malformed_json_unknown_model_and_unknown_route(client):
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = chat(client, model="other/model")
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404 and "error" in response.json()


def test_models_list_and_ids_with_slashes(client, backend):
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["fake/model-1"]
    assert client.get("/v1/models/fake/model-1").json()["id"] == "fake/model-1"
    assert client.get("/v1/models/fake/none").status_code == 404


def test_no_complete_chain_is_503_naming_the_missing_blocks(client, backend):
    backend.missing = [(15, 30)]
    response = chat(client)
    assert response.status_code == 503 and "15:30" in response.json()["error"]["message"]
    assert response.headers["retry-after"]
    assert client.get("/v1/models").json()["data"] == []
    assert client.get("/health").json()["complete_chain"] is False


def test_full_peers_give_503_with_retry_after(client, backend):
    backend.refuse = PeerError("KV budget exhausted", ErrorCode.CAPACITY)
    response = chat(client, stream=True)
    assert response.status_code == 503 and response.headers["retry-after"]


def test_failure_mid_stream_becomes_an_error_event_then_done(client, backend):
    backend.fail_after = 3
    events = sse_events(chat(client, stream=True))
    assert events[-1]["error"]["code"] == "swarm_error"
    assert "peer died" not in events[-1]["error"]["message"]  # a peer's own words go to the log, not to clients
    assert backend.open_sessions == 0


def test_overload_without_a_queue_is_429_with_retry_after(backend):
    settings = GatewaySettings(gateway_max_concurrent=1, gateway_max_queued=0)
    backend.gate = asyncio.Event()

    async def scenario():
        import httpx

        app = create_app(settings, backend=backend)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
                first = asyncio.create_task(http.post("/v1/chat/completions", json=body))
                while not backend.requests:
                    await asyncio.sleep(0.01)
                second = await http.post("/v1/chat/completions", json=body)
                backend.gate.set()
                return (await first).status_code, second

    first_status, second = asyncio.run(scenario())
    assert first_status == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "1"


def test_api_keys_and_cors_preflight(backend):
    settings = GatewaySettings(gateway_api_keys="k1, k2", gateway_cors_origins="http://ui.local")
    with TestClient(create_app(settings, backend=backend)) as client:
        assert chat(client).status_code == 401
        assert chat(client).json()["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": "Bearer k2"}
        assert client.post("/v1/chat/completions", headers=headers,
                           json={"model": "fake/model-1", "messages": [{"role": "user", "content": "x"}]}
                           ).status_code == 200
        preflight = client.options("/v1/chat/completions", headers={
            "Origin": "http://ui.local", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "http://ui.local"
        assert client.get("/health").status_code == 200  # liveness needs no key

