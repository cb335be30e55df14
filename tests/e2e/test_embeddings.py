"""/v1/embeddings through the swarm: all-MiniLM-L6-v2's encoder blocks on two peers (0:3 + 3:6), the gateway
driven by the official `openai` SDK; embeddings equal transformers' own model + mean pooling + normalisation."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from swarm.client.embeddings import SwarmEmbeddingService
from swarm.model.source import DEFAULT_MODEL_ID, EMBEDDING_MODEL_ID, resolve_model
from tests.e2e.test_gateway import free_port
from tests.launcher import LocalSwarm

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Swarms serve large language models.",
         "Photosynthesis turns light into chemical energy.", "a"]
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    resolve_model(DEFAULT_MODEL_ID)
    with LocalSwarm(tmp_path_factory.mktemp("embeddings")) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(EMBEDDING_MODEL_ID, blocks, wait=False) for blocks in ("0:3", "3:6")]
        peers.append(swarm.start_peer(DEFAULT_MODEL_ID, "0:30", wait=False))  # the gateway's text model
        for peer in peers:
            LocalSwarm.peer_id(peer)
        port = free_port()
        swarm.start_gateway(port, {"SWARM_INITIAL_PEERS": " ".join(swarm.initial_peers),
                                   "SWARM_EMBEDDING_MODEL": EMBEDDING_MODEL_ID})
        swarm.url = f"http://127.0.0.1:{port}"
        yield swarm


@pytest.fixture(scope="module")
def reference():
    path = resolve_model(EMBEDDING_MODEL_ID).path
    model, tokenizer = AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)

    def embed(text: str) -> torch.Tensor:
        with torch.inference_mode():
            states = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        return torch.nn.functional.normalize(states.mean(dim=0), dim=-1)

    return embed


def cosine(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


async def test_service_embeddings_match_transformers(swarm, reference):
    service = await SwarmEmbeddingService.connect(swarm.initial_peers, EMBEDDING_MODEL_ID)
    try:
        await service.client.wait_for_chain()
        vectors, tokens = await service.embed(TEXTS)
        assert vectors.shape == (len(TEXTS), 384) and tokens > len(TEXTS)
        for text, vector in zip(TEXTS, vectors, strict=True):
            assert cosine(vector, reference(text)) >= MIN_COSINE
            assert abs(float(vector.norm()) - 1) < 1e-5
        # different texts stay apart: the pooling does not wash everything into one vector
        assert cosine(vectors[0], vectors[2]) < 0.9
        with pytest.raises(ValueError, match="takes at most 512"):
            await service.embed([list(range(1000, 1600))])
    finally:
        await service.close()


async def test_gateway_embeddings_with_the_openai_sdk(swarm, reference):
    sdk = openai.AsyncOpenAI(base_url=f"{swarm.url}/v1", api_key="unused", max_retries=0)
    result = await sdk.embeddings.create(model=EMBEDDING_MODEL_ID, input=TEXTS)
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    assert result.model == EMBEDDING_MODEL_ID and result.usage.prompt_tokens == result.usage.total_tokens > 0
    for text, item in zip(TEXTS, result.data, strict=True):
        assert len(item.embedding) == 384 and cosine(item.embedding, reference(text)) >= MIN_COSINE
    single = await sdk.embeddings.create(model=EMBEDDING_MODEL_ID, input=TEXTS[1])
    assert len(single.data) == 1 and cosine(single.data[0].embedding, result.data[1].embedding) > 0.999999
    async with httpx.AsyncClient(base_url=swarm.url, timeout=60) as http:
        raw = (await http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL_ID, "input": TEXTS[0],
                                                       "encoding_format": "base64"})).json()
        decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype=np.float32).copy()
        assert cosine(decoded, result.data[0].embedding) > 0.999999
        models = (await http.get("/v1/models")).json()
        assert {m["id"] for m in models["data"]} == {DEFAULT_MODEL_ID, EMBEDDING_MODEL_ID}


@pytest.mark.parametrize(("body", "status", "fragment"), [
    ({"model": "nope", "input": "x"}, 404, "does not exist"),
    ({"model": EMBEDDING_MODEL_ID, "input": ""}, 400, "empty"),
    ({"model": EMBEDDING_MODEL_ID, "input": []}, 400, "empty"),
    ({"model": EMBEDDING_MODEL_ID, "input": "x", "dimensions": 128}, 400, "384-dimensional"),
    ({"model": EMBEDDING_MODEL_ID, "input": "word " * 700}, 400, "at most 512"),
    ({"model": EMBEDDING_MODEL_ID, "input": [[1, 2, 10**9]]}, 400, "token ids outside"),
    ({"model": EMBEDDING_MODEL_ID, "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
])
async def test_gateway_embeddings_refuse_bad_input(swarm, body, status, fragment):
    async with httpx.AsyncClient(base_url=swarm.url, timeout=60) as http:
        response = await http.post("/v1/embeddings", json=body)
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]["message"]
        # and the gateway still serves
        ok = await http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL_ID, "input": "still here"})
        assert ok.status_code == 200
