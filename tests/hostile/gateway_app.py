"""The gateway over the unit tests' scripted fake backends, for a real `uvicorn tests.hostile.gateway_app:app`
(settings from the environment, as the real app): HTTP-level hostile tests without a swarm. FAKE_STEP_SECONDS slows
each generation step (so that a test can catch requests in flight)."""

from __future__ import annotations

import asyncio
import os

from app.main import create_app
from tests.unit.test_gateway import FakeBackend
from tests.unit.test_gateway_shapes import FakeEmbeddings


class SlowBackend(FakeBackend):
    def __init__(self, step_seconds: float):
        super().__init__()
        self.step_seconds = step_seconds

    async def generate(self, request):
        async for events in super().generate(request):
            await asyncio.sleep(self.step_seconds)
            yield events


app = create_app(backend=SlowBackend(float(os.environ.get("FAKE_STEP_SECONDS", "0"))), embeddings=FakeEmbeddings())
