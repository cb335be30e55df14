"""The /v1 routes."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from app.errors import APIError
from app.protocol import ChatCompletionRequest, CompletionRequest
from app.responses import chat_jobs, completion_jobs, handle
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


async def _model_card(engine: ServingEngine) -> dict:
    return {"id": engine.backend.model_id, "object": "model", "created": 0, "owned_by": "swarm",
            "context_length": engine.backend.context_length}


def _embedding_card(service) -> dict:
    return {"id": service.model_id, "object": "model", "created": 0, "owned_by": "swarm",
            "context_length": service.context_length, "type": "embedding", "dimensions": service.dimensions}


@router.get("/models")
async def list_models(request: Request, engine: ServingEngine = Depends(engine)):
    cards = [await _model_card(engine)] if not await engine.backend.missing_blocks() else []
    service = getattr(request.app.state, "embeddings", None)
    if service is not None and not await service.missing_blocks():
        cards.append(_embedding_card(service))
    return {"object": "list", "data": cards}


@router.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request, engine: ServingEngine = Depends(engine)):
    service = getattr(request.app.state, "embeddings", None)
    if service is not None and model_id == service.model_id:
        missing = await service.missing_blocks()
        if missing:
            raise APIError(503, f"{model_id} is missing blocks {missing}", code="no_complete_chain", retry_after=5)
        return _embedding_card(service)
    engine.check_model(model_id)
    await engine.check_available()
    return await _model_card(engine)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, engine: ServingEngine = Depends(engine)):
    return await handle(engine, body, chat_jobs(engine, body), chat=True)


@router.post("/completions")
async def completions(body: CompletionRequest, engine: ServingEngine = Depends(engine)):
    return await handle(engine, body, completion_jobs(engine, body), chat=False)
