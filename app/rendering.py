"""How typed bodies go on the wire: one JSON serialization per body, SSE events, and the event-stream response that
releases what it streams from however it ends."""

from __future__ import annotations

from collections.abc import AsyncIterable, Mapping
from typing import Protocol

import anyio
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"


def json_response(body: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(body.model_dump_json(), status_code, headers, media_type="application/json")


def sse(body: BaseModel, exclude: set[str] | None = None) -> str:
    return f"data: {body.model_dump_json(exclude=exclude)}\n\n"


class Closeable(Protocol):
    async def aclose(self) -> None: ...


class EventStream(StreamingResponse):
    """A text/event-stream response that closes `owner` once it has ended, however it ended: streamed to the end,
    cancelled by a client disconnect, or never started (a client that leaves before the first byte: Starlette then
    never iterates `events`, so nothing inside them can be relied on to release `owner`)."""

    def __init__(self, events: AsyncIterable[str], owner: Closeable):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled request still closes its sessions on the peers
                await self.owner.aclose()
