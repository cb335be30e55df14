"""/v1/responses with `background: true` over the fake backend, each test with a gateway of its own: cancelled (by its
key, DELETE, the gateway stopping) with its generation closed to its end; kept while it runs; failures and cuts (its
polling through the SDK: test_responses_api)."""

from __future__ import annotations

import asyncio
import json

import httpx
from fastapi.testclient import TestClient

from app import responses_api
from app.main import create_app
from app.protocol.responses_api import ResponsesRequest
from app.settings import GatewaySettings
from app.tenants import Caller
from swarm.client.requests import TokenEvent
from tests.unit.test_gateway import EOS, REPLY, FakeBackend


class HeldBackend(FakeBackend):
    """One token, then nothing until `hold` is set (a long answer still being computed); closing a session takes
    `close_s` (as closing its peers' sessions does)."""

    def __init__(self, close_s: float = 0.0):
        super().__init__()
        self.hold, self.close_s = asyncio.Event(), close_s

    async def generate(self, request):
        self.requests.append(request)
        self.open_sessions += 1
        try:
            yield [TokenEvent(0, ord("a"))]
            await self.hold.wait()
            yield [TokenEvent(0, EOS, stop=True)]
        finally:
            await asyncio.sleep(self.close_s)
            self.open_sessions -= 1


def test_a_background_response_is_cancelled_by_its_key_and_by_the_gateway_stopping():
    backend = HeldBackend()
    settings = GatewaySettings(gateway_max_concurrent=4, gateway_api_keys="k1 k2")

    async def scenario():
        app = create_app(settings, backend=backend)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                def post(path, key="k1", **body):
                    return http.post(path, json=body or None, headers={"Authorization": f"Bearer {key}"})

                one = (await post("/v1/responses", model="fake/model-1", input="x", background=True)).json()
                asked = (await http.get(f"/v1/responses/{one['id']}/input_items",
                                        headers={"Authorization": "Bearer k1"})).json()["data"]
                two = (await post("/v1/responses", model="fake/model-1", input="y", background=True)).json()
                assert one["status"] == two["status"] == "in_progress" and backend.open_sessions == 2
                assert (await post(f"/v1/responses/{one['id']}/cancel", key="k2")).status_code == 404
                early = await post("/v1/responses", model="fake/model-1", input="and?", previous_response_id=one["id"])
                assert early.status_code == 400 and "in progress" in early.json()["error"]["message"]
                cancelled = (await post(f"/v1/responses/{one['id']}/cancel")).json()
                assert cancelled["status"] == "cancelled" and cancelled["output"][0]["content"][0]["text"] == "a"
                assert backend.open_sessions == 1  # its generation closed, its slot given back
                again = await http.get(f"/v1/responses/{one['id']}", headers={"Authorization": "Bearer k1"})
                assert again.json()["status"] == "cancelled"
                listed = (await http.get(f"/v1/responses/{one['id']}/input_items",
                                         headers={"Authorization": "Bearer k1"})).json()["data"]
                assert [item["id"] for item in listed] == [item["id"] for item in asked]  # the ids it began with
                three = (await post("/v1/responses", model="fake/model-1", input="z", background=True)).json()
                assert (await http.delete(f"/v1/responses/{three['id']}",
                                          headers={"Authorization": "Bearer k1"})).status_code == 200
                await asyncio.sleep(0.05)  # its computation stopped, and it is not kept again
                assert backend.open_sessions == 1 and (await http.get(
                    f"/v1/responses/{three['id']}", headers={"Authorization": "Bearer k1"})).status_code == 404
        # the lifespan has ended with `two` still waiting for its next token (the loop still runs)
        assert backend.open_sessions == 0
        assert app.state.conversations._items[two["id"]].response["status"] == "cancelled"

    asyncio.run(scenario())


def test_a_background_response_cancelled_as_soon_as_it_is_answered_gives_its_generation_back():
    """Cancelled before its task has run a step (a DELETE racing the answer): the generation is still closed."""
    backend = HeldBackend()

    async def scenario():
        app = create_app(GatewaySettings(gateway_max_concurrent=4), backend=backend)
        async with app.router.lifespan_context(app):
            store = app.state.conversations
            request = ResponsesRequest.model_validate({"model": "fake/model-1", "input": "x", "background": True})
            answer = await responses_api.handle(app.state.engine, store, request, Caller("someone"))
            made = json.loads(answer.body)
            assert backend.open_sessions == 1 and store.delete(made["id"])
            await asyncio.sleep(0.05)
            assert backend.open_sessions == 0 and store.entry(made["id"]) is None

    asyncio.run(scenario())


async def _background(app, caller: str = "someone", **body):
    """A background response made through the handler itself (no HTTP), as `caller`."""
    request = ResponsesRequest.model_validate({"model": "fake/model-1", "input": "x", "background": True, **body})
    answer = await responses_api.handle(app.state.engine, app.state.conversations, request, Caller(caller))
    return json.loads(answer.body)["id"]


def test_a_background_responses_generation_closes_to_its_end_whatever_cancels_it_meanwhile():
    """Cancelled, then deleted while its generation closes (which takes a while): the close is not cut short, its
    peers' sessions end; deleted, then the gateway stops: the stop waits for its close too."""
    backend = HeldBackend(close_s=0.05)

    async def scenario():
        app = create_app(GatewaySettings(gateway_max_concurrent=4), backend=backend)
        async with app.router.lifespan_context(app):
            store = app.state.conversations
            first = await _background(app)
            cancelling = asyncio.ensure_future(store.cancel(first))
            await asyncio.sleep(0.01)  # (closing now)
            assert store.delete(first)
            await cancelling
            await asyncio.sleep(0.1)
            assert backend.open_sessions == 0 and store.entry(first) is None and not store._running
            second = await _background(app)
            assert store.delete(second) and backend.open_sessions == 1
        assert backend.open_sessions == 0 and not store._running  # the lifespan waited for the deleted one's close

    asyncio.run(scenario())


def test_a_running_background_response_is_neither_expired_nor_pushed_out_by_others():
    backend = HeldBackend()

    async def scenario():
        settings = GatewaySettings(gateway_max_concurrent=4, gateway_responses_kept=2, gateway_responses_ttl=0.05)
        app = create_app(settings, backend=backend)
        async with app.router.lifespan_context(app):
            store = app.state.conversations
            running = await _background(app, caller="one")
            await asyncio.sleep(0.1)  # past its TTL
            for n in range(3):  # another key's responses, past the capacity
                store.put(f"resp_{n}", [], "another")
            assert store.entry(running) is not None and running in store._running
            assert len(store._items) == 2  # the finished ones went instead: the running one and the newest
            backend.hold.set()
            await asyncio.sleep(0.05)
            assert not store._running and store._items[running].response["status"] == "completed"

    asyncio.run(scenario())


def test_a_background_response_that_fails_or_is_cut_says_so():
    async def scenario():
        backend = FakeBackend()
        app = create_app(GatewaySettings(gateway_max_concurrent=4), backend=backend)
        async with app.router.lifespan_context(app):
            store = app.state.conversations
            backend.fail_after = 3
            failed = await _background(app)
            cut = None
            await asyncio.sleep(0.05)
            backend.fail_after = None
            cut = await _background(app, max_output_tokens=4)
            await asyncio.sleep(0.05)
            return store._items[failed].response, store._items[cut].response, backend.open_sessions

    failed, cut, still_open = asyncio.run(scenario())
    assert failed["status"] == "failed" and failed["error"]["code"] and "peer died" not in failed["error"]["message"]
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["content"][0]["text"] == REPLY[:3]
    assert cut["status"] == "incomplete" and cut["incomplete_details"]["reason"] == "max_output_tokens"
    assert cut["output"][0]["content"][0]["text"] == REPLY[:4] and still_open == 0


def test_background_responses_need_a_gateway_that_keeps_responses():
    backend = FakeBackend()
    with TestClient(create_app(GatewaySettings(gateway_responses_kept=0), backend=backend)) as client:
        refused = client.post("/v1/responses", json={"model": "fake/model-1", "input": "x", "background": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "background" and not backend.requests
