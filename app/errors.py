"""One exception type for every API error, its OpenAI error body, and the mapping of every other failure onto it.

What a client reads never holds internals: a swarm failure becomes a fixed message per kind (a peer's own words, which
a hostile peer chooses, and exception reprs go to the log only), and anything unforeseen is a 500 that says no more
than that.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.protocol.responses import ErrorInfo, ErrorResponse
from app.rendering import json_response
from swarm.protocol import ErrorCode, NoChainError, PeerError, SwarmError

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> ErrorResponse:
        kind = "insufficient_quota" if self.code == "insufficient_quota" else _TYPES.get(self.status, "api_error")
        return ErrorResponse(error=ErrorInfo(message=self.message, type=kind, param=self.param, code=self.code))

    def response(self, close: bool = False) -> Response:
        """The error as an HTTP response; `close`: the connection is closed after it (the body was not read)."""
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if close:
            headers["Connection"] = "close"
        return json_response(self.body(), self.status, headers)


def swarm_error(exc: Exception) -> APIError:
    """Map a failure to the HTTP error a client should see (logged here when the client is told less)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NoChainError):  # the block ranges this client's own view lacks: no peer's words
        spans = ", ".join(f"{start}:{end}" for start, end in exc.missing)
        return APIError(503, f"no live peers serve blocks {spans} of {exc.model_id}; retry later",
                        code="no_complete_chain", retry_after=5)
    if isinstance(exc, PeerError) and exc.code == ErrorCode.CAPACITY:
        logger.info("the swarm is at capacity: %r", exc)
        return APIError(503, "the swarm is at capacity; retry later", code="overloaded", retry_after=2)
    if isinstance(exc, SwarmError):
        logger.warning("a generation failed in the swarm: %r", exc)
        return APIError(503, "the swarm failed this request (a peer failed or left); retry", code="swarm_error",
                        retry_after=1)
    logger.error("internal error", exc_info=exc)
    return APIError(500, "internal error (the gateway's log has the details)", code="internal_error")


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "None", "json-or-python"}


def _location(error: dict[str, Any]) -> str:
    """The field an error is about, as OpenAI names params ("messages.0.content"): without "body" and without the
    union branches pydantic adds to a location ("str", "list[function-after[...]]", a model's class name)."""
    parts, chosen_tag = [], -1
    for i, x in enumerate(error.get("loc", ())):
        tag = isinstance(x, str) and (x == "body" or x in _TYPE_TAGS or "[" in x or "(" in x or x[:1].isupper())
        if not tag and i != chosen_tag:
            parts.append(str(x))
        if isinstance(x, str) and "tagged-union[" in x:  # the tag a tagged union chose comes next (after an index)
            chosen_tag = i + 1 if x.startswith("tagged-union[") else i + 2
    return ".".join(parts)


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A validation's errors (pydantic's) → the one message a client reads, and its param: our own checks' words
    where a union's branches also failed on type (an image part: "not supported", not "should be a valid string"),
    the branches' expectations joined otherwise."""
    errors = list(errors)
    if not errors:
        return "invalid request", None
    if any(error.get("type") == "json_invalid" for error in errors):
        return "request body is not valid JSON", None
    chosen = next((e for e in errors if e.get("type") in ("value_error", "assertion_error")), None)
    if chosen is None:  # else the branch of a union that came furthest into the value (a list, not "a string")
        chosen = max(errors, key=lambda e: len(e.get("loc", ())))
        if len(chosen.get("loc", ())) == len(errors[0].get("loc", ())):
            chosen = errors[0]
    param = _location(chosen)[:200] or None
    message = str(chosen.get("msg", "invalid request")).removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if str(chosen.get("type", "")).endswith("_type"):  # a union's branches that each wanted another type
        others = [str(e.get("msg", "")).removeprefix("Input should be ") for e in errors[1:]
                  if e is not chosen and _location(e) == _location(chosen) and str(e.get("type", "")).endswith("_type")]
        message = ", or ".join(dict.fromkeys([message, *others]))
    return f"{param + ': ' if param else ''}{message}"[:1000], param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(exc.errors())
        return APIError(400, message, param, "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), None, code).response()

    @app.exception_handler(Exception)
    async def unforeseen(request: Request, exc: Exception) -> Response:
        return swarm_error(exc).response()
