"""Fair admission when the gateway is saturated (`app.admission`): requests over the concurrency limit wait in a
bounded queue, admitted round-robin across API keys (client addresses without auth); a full queue or a wait beyond
the timeout is a 429; a client that disconnects while it waits leaves the queue; no slot is ever lost.

Over the scripted fake backend of test_gateway, driven in-process through httpx's ASGI transport; the order in
which the backend sees generations start is the order of admission.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.admission import Admission
from app.errors import APIError
from app.main import create_app
from app.settings import GatewaySettings
from tests.unit.test_gateway import FakeBackend
from tests.unit.test_gateway_slots import scope

KEYS = "key-a key-b"


def body(label: str, **overrides) -> dict:
    return {"model": "fake/model-1", "messages": [{"role": "user", "content": label}], "max_tokens": 2, **overrides}


def label_of(backend: FakeBackend, request) -> str:
    return backend.decode(request.prompt_ids).removeprefix("<user>").removesuffix("<assistant>")


async def until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met"
        await asyncio.sleep(0.005)


class Gateway:
    """The app over a fake backend whose generations wait at `backend.gate` before each step."""

    def __init__(self, **settings):
        self.backend = FakeBackend()
        self.backend.gate = asyncio.Event()
        self.app = create_app(GatewaySettings(**settings), backend=self.backend)

    async def __aenter__(self) -> Gateway:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        self.engine = self.app.state.engine
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self._lifespan.__aexit__(*exc)

    def post(self, label: str, key: str | None = None, **overrides) -> asyncio.Task:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return asyncio.create_task(self.http.post("/v1/chat/completions", json=body(label, **overrides),
                                                  headers=headers))

    async def queue(self, label: str, key: str | None = None, **overrides) -> asyncio.Task:
        """Post a request and return once it waits in the queue."""
        queued = self.engine.admission.queued
        task = self.post(label, key, **overrides)
        await until(lambda: self.engine.admission.queued == queued + 1)
        return task

    async def hold(self, label: str, key: str | None = None) -> asyncio.Task:
        """Post a request and return once it holds a slot (its generation waits at the gate)."""
        started = len(self.backend.requests)
        task = self.post(label, key)
        await until(lambda: len(self.backend.requests) == started + 1)
        return task

    def started(self) -> list[str]:
        return [label_of(self.backend, r) for r in self.backend.requests]


def assert_nothing_held(gateway: Gateway) -> None:
    admission = gateway.engine.admission
    assert (admission.active, admission.queued, admission._queues, gateway.backend.open_sessions) == (0, 0, {}, 0)


@pytest.mark.parametrize("stream", [False, True])
async def test_a_single_request_of_another_key_is_admitted_second_not_sixth(stream):
    async with Gateway(gateway_max_concurrent=1, gateway_api_keys=KEYS) as gateway:
        tasks = [await gateway.hold("a0", "key-a")]
        tasks += [await gateway.queue(f"a{i}", "key-a", stream=stream) for i in range(1, 6)]
        tasks.append(await gateway.queue("b0", "key-b", stream=stream))
        gateway.backend.gate.set()
        responses = await asyncio.gather(*tasks)
        assert [r.status_code for r in responses] == [200] * 7
        assert gateway.started() == ["a0", "a1", "b0", "a2", "a3", "a4", "a5"]
        assert_nothing_held(gateway)


async def test_without_auth_clients_take_turns_by_address():
    async with Gateway(gateway_max_concurrent=1) as gateway:
        other = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app, client=("10.0.0.2", 4000)),
                                  base_url="http://test")
        tasks = [await gateway.hold("a0")] + [await gateway.queue(f"a{i}") for i in (1, 2, 3)]
        queued = gateway.engine.admission.queued
        tasks.append(asyncio.create_task(other.post("/v1/chat/completions", json=body("b0"))))
        await until(lambda: gateway.engine.admission.queued == queued + 1)
        gateway.backend.gate.set()
        assert [r.status_code for r in await asyncio.gather(*tasks)] == [200] * 5
        assert gateway.started() == ["a0", "a1", "b0", "a2", "a3"]
        await other.aclose()
        assert_nothing_held(gateway)


def assert_429(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("rate_limit_error", code) and error["message"]


async def test_a_full_queue_and_a_wait_past_the_timeout_are_429():
    async with Gateway(gateway_max_concurrent=1, gateway_max_queued=1, gateway_queue_timeout=0.3) as gateway:
        holder = await gateway.hold("a0")
        waiting = await gateway.queue("a1")
        assert_429(await gateway.post("a2"), "overloaded")  # at once: the queue is full
        assert_429(await waiting, "queue_timeout")
        assert gateway.engine.admission.queued == 0 and gateway.engine.active == 1
        gateway.backend.gate.set()
        assert (await holder).status_code == 200
        assert gateway.started() == ["a0"]
        assert_nothing_held(gateway)


async def test_a_full_queue_refuses_the_newest_request_of_the_client_with_the_most_waiting():
    async with Gateway(gateway_max_concurrent=1, gateway_max_queued=3, gateway_api_keys=KEYS) as gateway:
        holder = await gateway.hold("a0", "key-a")
        a = [await gateway.queue(f"a{i}", "key-a") for i in (1, 2, 3)]
        b = gateway.post("b0", "key-b")
        assert_429(await a[2], "overloaded")  # key-a had 3 waiting, key-b none: key-a's newest gives way
        await until(lambda: gateway.engine.admission.queued == 3)
        assert_429(await gateway.post("b1", "key-b"), "overloaded")  # 2 against 1 + 1: no more gives way
        gateway.backend.gate.set()
        assert [r.status_code for r in await asyncio.gather(holder, a[0], a[1], b)] == [200] * 4
        assert gateway.started() == ["a0", "a1", "b0", "a2"]
        assert_nothing_held(gateway)


async def post_and_leave(app, label: str, leave: asyncio.Event) -> list[dict]:
    """POST over raw ASGI; the client disconnects once `leave` is set."""
    sent: list[dict] = []
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body(label)).encode(), "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope("/v1/chat/completions"), receive, send)
    return sent


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_disconnects_while_queued_leaves_the_queue(stream):
    async with Gateway(gateway_max_concurrent=1) as gateway:
        holder = await gateway.hold("a0")
        behind = await gateway.queue("a1")
        leave = asyncio.Event()
        gone = asyncio.create_task(post_and_leave(gateway.app, "gone", leave))
        await until(lambda: gateway.engine.admission.queued == 2)
        last = await gateway.queue("a2", stream=stream)
        leave.set()
        await asyncio.wait_for(gone, 5)
        assert gateway.engine.admission.queued == 2  # its place is freed at once, not when its turn comes
        gateway.backend.gate.set()
        assert [r.status_code for r in await asyncio.gather(holder, behind, last)] == [200] * 3
        assert gateway.started() == ["a0", "a1", "a2"]  # it never started a generation
        assert_nothing_held(gateway)


async def test_a_client_that_disconnects_during_a_non_streamed_answer_stops_it():
    async with Gateway(gateway_max_concurrent=1) as gateway:
        leave = asyncio.Event()
        gone = asyncio.create_task(post_and_leave(gateway.app, "gone", leave))
        await until(lambda: gateway.backend.open_sessions == 1)
        leave.set()
        await asyncio.wait_for(gone, 5)
        assert gateway.started() == ["gone"]
        assert_nothing_held(gateway)  # the generation was closed, and its slot is back


async def test_a_slot_granted_to_a_waiter_cancelled_at_that_moment_passes_to_the_next():
    admission = Admission(max_concurrent=1, max_queued=4, timeout=5)
    await admission.acquire("x")
    y = asyncio.create_task(admission.acquire("y"))
    z = asyncio.create_task(admission.acquire("z"))
    await until(lambda: admission.queued == 2)
    admission.release()  # the slot goes to y ...
    y.cancel()  # ... whose client leaves before it could run
    with pytest.raises(asyncio.CancelledError):
        await y
    await z
    assert (admission.active, admission.queued) == (1, 0)
    admission.release()
    assert (admission.active, admission.queued, admission._queues) == (0, 0, {})


async def test_an_evicted_waiter_gets_the_error_and_leaves_no_trace():
    admission = Admission(max_concurrent=1, max_queued=2, timeout=5)
    await admission.acquire("a")
    a1, a2 = asyncio.create_task(admission.acquire("a")), asyncio.create_task(admission.acquire("a"))
    await until(lambda: admission.queued == 2)
    b = asyncio.create_task(admission.acquire("b"))
    with pytest.raises(APIError):
        await a2
    for waiter in (a1, b):
        admission.release()
        await waiter
    admission.release()
    assert (admission.active, admission.queued, admission._queues) == (0, 0, {})
