"""The exact fields of every body the gateway sends (which keys exist, which are null, which are absent), so that
clients parsing strictly see the same objects whatever builds them. Over the scripted fake backend of test_gateway."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import GatewaySettings
from tests.unit.test_gateway import REPLY, FakeBackend, chat, sse_events

COMPLETION_KEYS = {"id", "object", "created", "model", "choices", "usage", "system_fingerprint"}
CHUNK_KEYS = {"id", "object", "created", "model", "system_fingerprint", "choices"}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
              "completion_tokens_details"}
LOGPROB_KEYS = {"token", "logprob", "bytes"}
LEGACY_LOGPROB_KEYS = {"tokens", "token_logprobs", "top_logprobs", "text_offset"}


class FakeEmbeddings:
    model_id = "fake/embedder"
    context_length = 128
    dimensions = 3

    async def missing_blocks(self):
        return []

    def tokenize(self, text):
        return list(text.encode())

    async def embed(self, inputs):
        return torch.tensor([[0.25, -0.5, float(i)] for i in range(len(inputs))]), 7 * len(inputs)


@pytest.fixture
def client():
    app = create_app(GatewaySettings(), backend=FakeBackend(), embeddings=FakeEmbeddings())
    with TestClient(app) as client:
        yield client


def completion(client, **overrides):
    return client.post("/v1/completions", json={"model": "fake/model-1", "prompt": "hi", **overrides})


def test_chat_completion_body_fields(client):
    response = chat(client, max_tokens=2)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == COMPLETION_KEYS and body["system_fingerprint"] is None
    assert (body["object"], body["model"], type(body["created"])) == ("chat.completion", "fake/model-1", int)
    assert set(body["usage"]) == USAGE_KEYS and body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_non_ascii_text_is_sent_as_utf8_not_escaped(client):
    assert "wörld".encode() in chat(client).content
    assert '"content":"ö"'.encode() in chat(client, stream=True).content.replace(b" ", b"")


def test_chat_logprobs_fields(client):
    choice = chat(client, logprobs=True, top_logprobs=1, max_tokens=2).json()["choices"][0]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    entry = choice["logprobs"]["content"][0]
    assert set(choice["logprobs"]) == {"content"} and set(entry) == LOGPROB_KEYS | {"top_logprobs"}
    assert entry == {"token": "H", "logprob": -0.5, "bytes": [72],
                     "top_logprobs": [{"token": "H", "logprob": -0.5, "bytes": [72]}]}
    assert chat(client, logprobs=True, max_tokens=1).json()["choices"][0]["logprobs"]["content"][0][
        "top_logprobs"] == []


def test_chat_chunks_fields_without_usage(client):
    events = sse_events(chat(client, stream=True, max_tokens=3))
    assert all(set(e) == CHUNK_KEYS and e["system_fingerprint"] is None for e in events)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    choices = [c for e in events for c in e["choices"]]
    assert all(set(c) == {"index", "delta", "logprobs", "finish_reason"} for c in choices)
    assert choices[0] == {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}
    assert [c["delta"] for c in choices[1:]] == [{"content": ch} for ch in REPLY[:3]]
    assert [c["finish_reason"] for c in choices[1:]] == [None, None, "length"]


def test_chat_chunks_with_usage_and_logprobs(client):
    events = sse_events(chat(client, stream=True, max_tokens=2, n=2, logprobs=True,
                             stream_options={"include_usage": True}))
    assert all(set(e) == CHUNK_KEYS | {"usage"} for e in events)
    assert [e["usage"] is None for e in events] == [True] * (len(events) - 1) + [False]
    assert events[-1]["choices"] == [] and set(events[-1]["usage"]) == USAGE_KEYS
    assert [c["index"] for c in events[0]["choices"]] == [0, 1]
    content = events[1]["choices"][0]["logprobs"]["content"]
    assert content == [{"token": "H", "logprob": -0.5, "bytes": [72], "top_logprobs": []}]


def test_eos_step_sends_an_empty_delta_with_its_finish_reason(client):
    events = sse_events(chat(client, stream=True))
    assert events[-1]["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]


def test_text_completion_body_and_chunk_fields(client):
    body = completion(client, max_tokens=2, logprobs=1).json()
    assert set(body) == COMPLETION_KEYS and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    choice = body["choices"][0]
    assert set(choice) == {"index", "text", "finish_reason", "logprobs"}
    assert choice["logprobs"] == {"tokens": ["H", "e"], "token_logprobs": [-0.5, -0.5],
                                  "top_logprobs": [{"H": -0.5}, {"e": -0.5}], "text_offset": [0, 1]}
    assert completion(client, max_tokens=1).json()["choices"][0]["logprobs"] is None
    events = sse_events(completion(client, max_tokens=2, stream=True, logprobs=0))
    assert all(set(e) == CHUNK_KEYS and e["object"] == "text_completion" for e in events)
    choices = [c for e in events for c in e["choices"]]
    assert choices[0] == {"index": 0, "text": "H", "finish_reason": None,
                          "logprobs": {"tokens": ["H"], "token_logprobs": [-0.5], "top_logprobs": [{"H": -0.5}],
                                       "text_offset": [0]}}
    assert set(choices[0]) == {"index", "text", "logprobs", "finish_reason"}


def test_model_cards(client):
    from app.protocol.responses import SERVING_SINCE

    listing = client.get("/v1/models").json()
    assert set(listing) == {"object", "data"} and listing["object"] == "list"
    since = SERVING_SINCE  # (when the gateway process began: a time, not 0)
    assert listing["data"] == [
        {"id": "fake/model-1", "object": "model", "created": since, "owned_by": "swarm", "context_length": 256},
        {"id": "fake/embedder", "object": "model", "created": since, "owned_by": "swarm", "context_length": 128,
         "type": "embedding", "dimensions": 3}]
    assert client.get("/v1/models/fake/model-1").json() == listing["data"][0]
    assert client.get("/v1/models/fake/embedder").json() == listing["data"][1]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_body(client, encoding):
    body = client.post("/v1/embeddings", json={"model": "fake/embedder", "input": ["a", "b"],
                                               "encoding_format": encoding}).json()
    assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list"
    assert body["model"] == "fake/embedder" and body["usage"] == {"prompt_tokens": 14, "total_tokens": 14}
    assert [set(d) for d in body["data"]] == [{"object", "index", "embedding"}] * 2
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    vectors = [d["embedding"] for d in body["data"]]
    if encoding == "base64":
        vectors = [np.frombuffer(base64.b64decode(v), dtype=np.float32).tolist() for v in vectors]
    assert vectors == [[0.25, -0.5, 0.0], [0.25, -0.5, 1.0]]


def test_error_bodies_have_exactly_the_openai_fields(client):
    for response in (chat(client, n=0), chat(client, model="x"), client.get("/v1/nothing"),
                     client.post("/v1/embeddings", json={"model": "x", "input": "a"})):
        assert set(response.json()) == {"error"}, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert chat(client, model="x").json()["error"] == {
        "message": "model 'x' does not exist; this gateway serves 'fake/model-1'", "type": "not_found_error",
        "param": "model", "code": "model_not_found"}
