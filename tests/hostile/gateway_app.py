"""The gateway over the unit tests' scripted fake backends, for a real `uvicorn tests.hostile.gateway_app:app`
(settings from the environment, as the real app): HTTP-level hostile tests without a swarm."""

from __future__ import annotations

from app.main import create_app
from tests.unit.test_gateway import FakeBackend
from tests.unit.test_gateway_shapes import FakeEmbeddings

app = create_app(backend=FakeBackend(), embeddings=FakeEmbeddings())
