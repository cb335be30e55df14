"""What the served model can do shapes what the gateway accepts: a model without a chat template (a base model, as
Gemma 3 270M's GGUF) refuses chat requests before anything is computed and still completes prompts."""

from __future__ import annotations

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import GatewaySettings
from tests.unit.test_gateway import FakeBackend, chat


class BaseModelBackend(FakeBackend):
    """A model without a chat template (Gemma 3 270M's GGUF, a base model); its grammars must not be compiled."""

    chats = False

    def check_grammar(self, grammar):
        raise AssertionError("a grammar compiled for a request refused anyway")


def test_a_model_without_a_chat_template_refuses_chats_at_once_and_still_completes():
    with TestClient(create_app(GatewaySettings(), backend=BaseModelBackend())) as client:
        schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}
        for response, param in ((chat(client), "messages"), (chat(client, stream=True), "messages"),
                                (chat(client, response_format=schema), "messages"),
                                (client.post("/v1/responses", json={"model": "fake/model-1", "input": "hi"}), "input")):
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["message"] == ("fake/model-1 has no chat template (a base model): send its prompts to "
                                        "/v1/completions") and error["param"] == param
        completion = client.post("/v1/completions", json={"model": "fake/model-1", "prompt": "hi", "max_tokens": 4})
    assert completion.status_code == 200 and completion.json()["choices"][0]["text"]
