"""The /v1 routes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from app.completions import ChatAnswer, TextAnswer, chat_jobs, completion_jobs, handle
from app.errors import APIError
from app.protocol.requests import ChatCompletionRequest, CompletionRequest
from app.protocol.responses import EmbeddingModelCard, ModelCard, ModelList
from app.rendering import json_response
from app.serving import ServingEngine


def engine(request: Request) -> ServingEngine:
    return request.app.state.engine


def require_api_key(request: Request) -> None:
    keys = request.app.state.api_keys
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or token.strip() not in keys:
        raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _model_card(engine: ServingEngine) -> ModelCard:
    return ModelCard(id=engine.backend.model_id, context_length=engine.backend.context_length)


def _embedding_card(service: Any) -> EmbeddingModelCard:
    return EmbeddingModelCard(id=service.model_id, context_length=service.context_length,
                              dimensions=service.dimensions)


@router.get("/models")
async def list_models(request: Request, engine: ServingEngine = Depends(engine)) -> Response:
    cards = [_model_card(engine)] if not await engine.backend.missing_blocks() else []
    service = getattr(request.app.state, "embeddings", None)
    if service is not None and not await service.missing_blocks():
        cards.append(_embedding_card(service))
    return json_response(ModelList(data=cards))


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request, engine: ServingEngine = Depends(engine)) -> Response:
    service = getattr(request.app.state, "embeddings", None)
    if service is not None and model_id == service.model_id:
        missing = await service.missing_blocks()
        if missing:
            raise APIError(503, f"{model_id} is missing blocks {missing}", code="no_complete_chain", retry_after=5)
        return json_response(_embedding_card(service))
    engine.check_model(model_id)
    await engine.check_available()
    return json_response(_model_card(engine))


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, engine: ServingEngine = Depends(engine)) -> Response:
    return await handle(engine, body, chat_jobs(engine, body), ChatAnswer(body.model))


@router.post("/completions")
async def completions(body: CompletionRequest, engine: ServingEngine = Depends(engine)) -> Response:
    return await handle(engine, body, completion_jobs(engine, body), TextAnswer(body.model))
