"""How typed bodies go on the wire: one JSON serialization per body, SSE events, keep-alive comments, and the
event-stream response that releases what it streams from however it ends.

The SSE framing is written here by hand rather than with sse-starlette: an event is one preformatted string, the
keep-alive is `with_keepalive` (below), and disconnects are already the EventStream's (it closes what it streams);
sse-starlette would add a second disconnect watcher and its own ping task to the same stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from typing import Protocol

import anyio
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it; proxies and frontends see a live stream


async def with_keepalive(events: AsyncIterable[str], interval: float) -> AsyncIterator[str]:
    """`events`, with a keep-alive comment whenever `interval` seconds pass without one (a long prefill, a wait for
    a slot, a failover). The next event is awaited in a task, so that a timeout never interrupts `events` itself."""
    iterator = aiter(events)
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(iterator))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:  # the client left while an event was awaited: stop producing it, and wait until
            pending.cancel()     # it has stopped (then `events` can be closed, and what it holds released)
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await pending


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

    def __init__(self, events: AsyncIterable[str], owner: Closeable, request_id: str | None = None):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request_id is not None:
            headers["x-request-id"] = request_id
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.owner = owner

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled request still closes its sessions on the peers
                close = getattr(self.body_iterator, "aclose", None)
                if close is not None:  # first the events (a keep-alive's pending step is cancelled and awaited),
                    with contextlib.suppress(Exception):  # so that the owner's stream is not running when closed
                        await close()
                await self.owner.aclose()
