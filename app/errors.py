"""One exception type for every API error, its OpenAI error body, and the mapping of swarm failures onto it."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.protocol.responses import ErrorInfo, ErrorResponse
from app.rendering import json_response
from swarm.protocol import ErrorCode, NoChainError, PeerError, SwarmError

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          429: "rate_limit_error", 503: "service_unavailable"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after = retry_after

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=_TYPES.get(self.status, "api_error"),
                                             param=self.param, code=self.code))

    def response(self) -> Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return json_response(self.body(), self.status, headers)


def swarm_error(exc: Exception) -> APIError:
    """Map a swarm failure to the HTTP error a client should see."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, NoChainError):
        return APIError(503, str(exc), code="no_complete_chain", retry_after=5)
    if isinstance(exc, PeerError) and exc.code == ErrorCode.CAPACITY:
        return APIError(503, f"the swarm is at capacity: {exc}", code="overloaded", retry_after=2)
    if isinstance(exc, SwarmError):
        return APIError(503, f"the swarm failed this request: {exc}", code="swarm_error", retry_after=1)
    return APIError(500, f"internal error: {exc!r}", code="internal_error")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return "request body is not valid JSON", None
    param = ".".join(loc) or None
    return f"{param + ': ' if param else ''}{first.get('msg', 'invalid request')}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return APIError(400, message, param, "invalid_request").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), None, code).response()
