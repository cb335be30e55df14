"""The gateway's /metrics and its per-generation log line, over the fake backend: counts equal the answers' usage,
refusals are counted by status, and no prompt or answer text reaches the log."""

from __future__ import annotations

import asyncio
import logging
import re

from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import GatewaySettings
from tests.unit.test_gateway import REPLY, FakeBackend, sse_events

SECRET = "my secret prompt about zebras"


def scrape(client) -> dict[str, float]:
    text = client.get("/metrics", headers={"Authorization": "Bearer k1"}).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M)}


def test_metrics_count_requests_tokens_and_outcomes_and_the_log_keeps_no_text(caplog):
    backend = FakeBackend()
    settings = GatewaySettings(gateway_api_keys="k1")
    auth = {"Authorization": "Bearer k1"}
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": SECRET}]}
    with caplog.at_level(logging.INFO), TestClient(create_app(settings, backend=backend)) as client:
        whole = client.post("/v1/chat/completions", json=body, headers=auth).json()
        sse_events(client.post("/v1/chat/completions", json={**body, "stream": True, "max_tokens": 4}, headers=auth))
        assert client.post("/v1/chat/completions", json=body).status_code == 401  # no key
        assert client.post("/v1/chat/completions", json={**body, "n": 0}, headers=auth).status_code == 400
        metrics = scrape(client)
    assert metrics['swarm_gateway_requests_total{route="/v1/chat/completions",status="200"}'] == 2
    assert metrics['swarm_gateway_requests_total{route="/v1/chat/completions",status="401"}'] == 1
    assert metrics['swarm_gateway_requests_total{route="/v1/chat/completions",status="400"}'] == 1
    assert metrics['swarm_gateway_generations_total{outcome="ok"}'] == 2
    assert metrics["swarm_gateway_time_to_first_token_seconds_count"] == 2
    assert metrics["swarm_gateway_completion_tokens_total"] == whole["usage"]["completion_tokens"] + 4
    assert metrics["swarm_gateway_prompt_tokens_total"] == 2 * whole["usage"]["prompt_tokens"]
    assert metrics["swarm_gateway_active_generations"] == 0 and metrics["swarm_gateway_queued_requests"] == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "app.requests"]
    assert len(lines) == 2 and all("outcome=ok" in line and "client=key:" in line for line in lines)
    everything = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET not in everything and "zebras" not in everything and REPLY[:20] not in everything
    assert "k1" not in " ".join(lines)  # the key's digest names the client, never the key


def test_metrics_count_drafted_tokens_kept_and_rejected_as_usage_does():
    from tests.unit.test_gateway import DraftingBackend

    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}]}
    with TestClient(create_app(GatewaySettings(), backend=DraftingBackend())) as client:
        before = scrape(client)
        assert before['swarm_gateway_draft_tokens_total{outcome="kept"}'] == 0
        cut = client.post("/v1/chat/completions", json={**body, "stop": ["d"]}).json()["usage"]
        whole = client.post("/v1/chat/completions", json=body).json()["usage"]
        metrics = scrape(client)
    details = [cut["completion_tokens_details"], whole["completion_tokens_details"]]
    assert metrics['swarm_gateway_draft_tokens_total{outcome="kept"}'] == sum(
        d["accepted_prediction_tokens"] for d in details) == 9
    assert metrics['swarm_gateway_draft_tokens_total{outcome="rejected"}'] == sum(
        d["rejected_prediction_tokens"] for d in details) == 3


def test_a_client_that_leaves_mid_stream_is_counted_as_cancelled():
    from tests.unit.test_gateway_slots import drive, request

    async def scenario():
        app = create_app(GatewaySettings(), backend=FakeBackend())
        async with app.router.lifespan_context(app):
            await drive(app, request(stream=True), disconnect_at=2)  # gone after the first event
            text = app.state.engine.metrics.render()[0].decode()
        return text

    text = asyncio.run(scenario())
    assert 'swarm_gateway_generations_total{outcome="cancelled"} 1.0' in text
    assert 'outcome="ok"' not in text
