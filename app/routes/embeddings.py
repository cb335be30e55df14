"""POST /v1/embeddings: sentence embeddings of an encoder-only model served by the swarm (OpenAI's shape)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from fastapi import Depends, Request
from fastapi.responses import Response

from app.errors import APIError, swarm_error
from app.protocol.requests import EmbeddingRequest
from app.protocol.responses import Embedding, EmbeddingList, EmbeddingUsage
from app.rendering import json_response
from app.routes.openai import engine, router
from app.serving import CHARS_PER_TOKEN, ServingEngine


class EmbeddingBackend(Protocol):
    """What the gateway needs of an embedding model. `tokenize` is called from worker threads; `embed` raises
    ValueError, with a message for the client, for inputs it refuses."""

    model_id: str
    context_length: int
    dimensions: int

    async def missing_blocks(self) -> list[tuple[int, int]]: ...
    def tokenize(self, text: str) -> list[int]: ...
    async def embed(self, inputs: Sequence[Sequence[int]]) -> tuple[Any, int]: ...  # vectors [N, dimensions], tokens


def embedding_service(request: Request) -> EmbeddingBackend | None:
    return request.app.state.embeddings


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, engine: ServingEngine = Depends(engine),
                     service: EmbeddingBackend | None = Depends(embedding_service)) -> Response:
    if service is None:
        raise APIError(404, f"model {body.model!r} does not exist here: this gateway serves no embedding model "
                            "(set SWARM_EMBEDDING_MODEL)", "model", "model_not_found")
    if body.model != service.model_id:
        raise APIError(404, f"model {body.model!r} does not exist here; the embedding model is "
                            f"{service.model_id!r}", "model", "model_not_found")
    if body.dimensions is not None and body.dimensions != service.dimensions:
        raise APIError(400, f"{service.model_id} makes {service.dimensions}-dimensional embeddings; 'dimensions' "
                            "cannot change that", "dimensions", "invalid_value")
    inputs = body.inputs()
    if any(isinstance(item, str) and not item for item in inputs):
        raise APIError(400, "input must not contain empty strings", "input", "invalid_value")
    limit = CHARS_PER_TOKEN * service.context_length
    if any(isinstance(item, str) and len(item) > limit for item in inputs):
        raise APIError(400, f"an input is over {limit} characters, more than {service.model_id} takes", "input",
                       "context_length_exceeded")
    try:
        token_ids = await engine.tokenize(_tokenize_all, service, inputs)
        vectors, tokens = await service.embed(token_ids)
    except ValueError as e:
        raise APIError(400, str(e)[:300], "input", "invalid_value") from e
    except Exception as e:
        raise swarm_error(e) from e
    data = []
    for i, vector in enumerate(vectors):
        if body.encoding_format == "base64":
            embedding: list[float] | str = base64.b64encode(vector.numpy().astype(np.float32).tobytes()).decode()
        else:
            embedding = vector.tolist()
        data.append(Embedding(index=i, embedding=embedding))
    return json_response(EmbeddingList(data=data, model=service.model_id,
                                       usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)))


def _tokenize_all(service: EmbeddingBackend, inputs: list[str | list[int]]) -> list[list[int]]:
    return [service.tokenize(item) if isinstance(item, str) else item for item in inputs]
