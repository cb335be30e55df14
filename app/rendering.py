"""How typed bodies go on the wire: one JSON serialization per body, and SSE events."""

from __future__ import annotations

from collections.abc import Mapping

from fastapi.responses import Response
from pydantic import BaseModel

DONE = "data: [DONE]\n\n"


def json_response(body: BaseModel, status_code: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(body.model_dump_json(), status_code, headers, media_type="application/json")


def sse(body: BaseModel, exclude: set[str] | None = None) -> str:
    return f"data: {body.model_dump_json(exclude=exclude)}\n\n"
