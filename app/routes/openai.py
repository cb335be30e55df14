"""The /v1 routes."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from app.completions import ChatAnswer, TextAnswer, chat_jobs, completion_jobs, handle
from app.conversations import ConversationStore, StoredResponse
from app.errors import APIError
from app.protocol.requests import ChatCompletionRequest, CompletionRequest
from app.protocol.responses import EmbeddingModelCard, ModelCard, ModelList
from app.protocol.responses_api import ResponsesRequest
from app.rendering import json_response
from app.responses_api import handle as handle_response
from app.serving import ServingEngine
from app.tenants import Caller


def engine(request: Request) -> ServingEngine:
    return request.app.state.engine


def caller_of(request: Request) -> Caller:
    """Who sent the request (app.guard put it in the request's state: its key, its limits)."""
    return request.state.caller


async def unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """`work`, cancelled if the client disconnects before it has a response (while its prompt waits for a tokenizer,
    while it waits for a slot, or while a non-streamed answer is generated): nothing goes on for a client that left.
    A stream watches for itself."""
    response: Response = Response(status_code=499)  # "client closed request": sent to no one

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":  # the body is read: nothing else comes
            pass
        scope.cancel()

    error: Exception | None = None
    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            response = await work
        except Exception as e:  # raised below, not wrapped in the task group's ExceptionGroup
            error = e
        group.cancel_scope.cancel()
    if error is not None:
        raise error
    return response


router = APIRouter(prefix="/v1")  # the API key is checked before the body is read: app.guard


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
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: ServingEngine = Depends(engine),
                           caller: Caller = Depends(caller_of)) -> Response:
    async def answer() -> Response:
        jobs = await chat_jobs(engine, body)
        return await handle(engine, body, jobs, ChatAnswer(body.model, body.legacy_functions), caller)

    return await unless_disconnected(request, answer())


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, engine: ServingEngine = Depends(engine),
                      caller: Caller = Depends(caller_of)) -> Response:
    async def answer() -> Response:
        jobs = await completion_jobs(engine, body)
        return await handle(engine, body, jobs, TextAnswer(body.model), caller)

    return await unless_disconnected(request, answer())


@router.post("/responses")
async def responses(body: ResponsesRequest, request: Request, engine: ServingEngine = Depends(engine),
                    caller: Caller = Depends(caller_of)) -> Response:
    store: ConversationStore = request.app.state.conversations
    return await unless_disconnected(request, handle_response(engine, store, body, caller))


def _stored(request: Request, response_id: str, caller: Caller) -> StoredResponse:
    entry = request.app.state.conversations.entry(response_id, caller.key_id)
    if entry is None:
        raise _unknown(response_id)
    return entry


def _unknown(response_id: str) -> APIError:
    return APIError(404, f"response {response_id!r} is not known here (or has expired)", None, "not_found")


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request, caller: Caller = Depends(caller_of)) -> Response:
    return JSONResponse(_stored(request, response_id, caller).response)


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request, caller: Caller = Depends(caller_of)) -> Response:
    if not request.app.state.conversations.delete(response_id, caller.key_id):
        raise _unknown(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.post("/responses/{response_id}/cancel")
async def cancel_response(response_id: str, request: Request, caller: Caller = Depends(caller_of)) -> Response:
    """A background response stops where it is (status cancelled, the output so far); one that has ended is
    answered as it is."""
    if not _stored(request, response_id, caller).response.get("background"):
        raise APIError(400, f"response {response_id!r} is not a background response: only those can be cancelled",
                       None, "invalid_request")
    await request.app.state.conversations.cancel(response_id)
    return JSONResponse(_stored(request, response_id, caller).response)


@router.get("/responses/{response_id}/input_items")
async def response_input_items(response_id: str, request: Request, order: Literal["asc", "desc"] = "desc",
                               limit: int = Query(20, ge=1, le=100), after: str | None = None,
                               caller: Caller = Depends(caller_of)) -> Response:
    """OpenAI's list: newest first by default, `limit` of them after the item `after`."""
    items = list(_stored(request, response_id, caller).items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    page = items[:limit]
    return JSONResponse({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit})


@router.get("/swarm")
async def swarm_view(engine: ServingEngine = Depends(engine)) -> Response:
    """This gateway's view of its swarm (not an OpenAI route): the model's blocks, every peer over its span (state,
    precision, throughput, load, free KV, RTT and decode step as measured from here, banned or not), coverage, holes,
    the best chain, and the routes of the last generations (by the id their answers carry in `x-request-id`)."""
    view_of = getattr(engine.backend, "swarm_view", None)
    view = await view_of() if view_of is not None else {"model_id": engine.backend.model_id, "num_blocks": 0,
                                                         "peers": [], "coverage": [], "holes": [], "best_chain": None}
    return JSONResponse({**view, "recent_routes": list(engine.recent_routes)})
