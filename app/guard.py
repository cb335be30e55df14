"""The gateway's edge, in front of every route (pure ASGI, so that nothing is read before it decides): the API key is
checked from the headers before any byte of the body is read (`app.tenants`: the request's `Caller` goes in the
scope's state, and its key's `x-ratelimit-*` headers on the answer); the body is then read within a size limit (a
Content-Length over it is refused at once, a body that grows past it is refused as soon as it does: 413) and a time
limit (a body that trickles in: 408), and handed on whole. Both refusals close the connection, since the rest of the
body was not read. Only /health (liveness probes) and / (the playground's static page) are open without a key.

What an ASGI app cannot bound: how long the request line and headers take to arrive (uvicorn has no header timeout;
h11 bounds their size to 16 KiB) and how many connections are open. Those are the server's or a reverse proxy's
settings (README, "Threat model": an HTTP client, to the gateway).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import bearer_token
from app.errors import APIError
from app.tenants import Access, Caller

PUBLIC_PATHS = frozenset({"/health", "/"})  # liveness probes; the playground's page (it holds no data)


class _TooLarge(Exception):
    pass


class RequestGuard:
    def __init__(self, app: ASGIApp, access: Access, max_body_bytes: int, body_timeout: float):
        self.app, self.access = app, access
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        address = scope["client"][0] if scope.get("client") else ""
        caller = (Caller("addr:" + address) if scope["path"] in PUBLIC_PATHS
                  else self.access.authenticate(bearer_token(scope), address))
        if caller is None:
            error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                             code="invalid_api_key")
            await error.response(close=True)(scope, receive, send)
            return
        caller.endpoint = scope["path"]
        scope.setdefault("state", {})["caller"] = caller
        if caller.tenant is not None and (caller.tenant.requests or caller.tenant.tokens):
            send = _with_limit_headers(send, caller)
        try:
            body = await self._read_body(scope, receive)
        except _TooLarge:
            error = APIError(413, f"the request body is larger than {self.max_body_bytes} bytes",
                             code="request_too_large")
        except TimeoutError:
            error = APIError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                             code="request_timeout")
        except ValueError:
            error = APIError(400, "invalid Content-Length header", code="invalid_request")
        else:
            if body is not None:  # None: the client left while sending it
                await self.app(scope, _replay(body, receive), send)
            return
        await error.response(close=True)(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _TooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)


def _with_limit_headers(send: Send, caller: Caller) -> Send:
    """`send` adding the caller's `x-ratelimit-*` headers (as they stand when the answer starts) to the answer."""
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and caller.tenant is not None:
            message = {**message, "headers": [*message.get("headers", ()), *caller.tenant.headers(time.time())]}
        await send(message)

    return sending


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            if not value.isdigit():
                raise ValueError(value)
            return int(value)
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """`receive` for the app: the body already read as one message, then the client's own messages (a
    disconnect)."""
    pending = True

    async def replayed() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
