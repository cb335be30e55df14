"""Every request gives back its concurrency slot and closes the generation it started, on every path: answered,
streamed to the end, failed, refused, or abandoned by a client that disconnects before or during the stream.

The app is driven as ASGI directly, so that this test chooses when the disconnect arrives: `send` yields to the
event loop like a real server's socket write, and `receive` reports the disconnect at the chosen message.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from app.main import create_app
from app.settings import GatewaySettings
from swarm.protocol import ErrorCode, PeerError
from tests.unit.test_gateway import FakeBackend


def scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000), "server": ("test", 80)}


async def drive(app, body: dict, disconnect_at: int | None) -> list[dict]:
    """POST `body` to /v1/chat/completions; the client disconnects while message number `disconnect_at` is sent to
    it (0: the response start, before any byte of the body); None: it reads the whole response."""
    sent: list[dict] = []
    gone = asyncio.Event()
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if disconnect_at is not None and len(sent) >= disconnect_at:
            gone.set()
        sent.append(message)
        await asyncio.sleep(0)  # a socket write yields: the disconnect can be seen before the next message

    await app(scope("/v1/chat/completions"), receive, send)
    return sent


def run(backend: FakeBackend, body: dict, disconnect_at: int | None = None) -> tuple[list[dict], tuple[int, int]]:
    """Drive one request; return the messages sent, and the slots held and backend generations open right after the
    app returned (read before anything else runs on the loop: no garbage-collection hook closes them meanwhile)."""

    async def scenario():
        app = create_app(GatewaySettings(gateway_max_concurrent=2), backend=backend)
        async with app.router.lifespan_context(app):
            sent = await drive(app, body, disconnect_at)
            return sent, (app.state.engine.active, backend.open_sessions)

    return asyncio.run(scenario())


def request(**overrides) -> dict:
    return {"model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, **overrides}


def body_bytes(sent: list[dict]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


class Client:
    """One streamed POST driven by hand: `sent` collects what the app sends, `leave()` makes the client disconnect,
    `on_send` (optional) sees each message as it is sent."""

    def __init__(self, app, body: dict, on_send=None):
        self.sent: list[dict] = []
        self.gone = asyncio.Event()
        self.on_send = on_send
        self._body = json.dumps(body).encode()
        self._requested = False
        self.task = asyncio.create_task(app(scope("/v1/chat/completions"), self._receive, self._send))

    async def _receive(self) -> dict:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": self._body}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict) -> None:
        self.sent.append(message)
        if self.on_send is not None:
            self.on_send(message)

    def leave(self) -> None:
        self.gone.set()

    async def until(self, condition) -> None:
        while not condition(body_bytes(self.sent)):
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("disconnect_at", [0, 1, 3])
def test_disconnect_before_or_during_the_stream_frees_the_slot_and_closes_the_generation(disconnect_at):
    backend = FakeBackend()
    sent, (active, open_sessions) = run(backend, request(stream=True), disconnect_at)
    assert len(backend.requests) == 1  # the generation was started (its first step runs before the response)
    assert b"[DONE]" not in body_bytes(sent)  # the client really left early
    assert active == 0, "the concurrency slot leaked"
    assert open_sessions == 0, "the started generation was not closed"


@pytest.mark.parametrize("stream", [False, True])
def test_answered_requests_free_the_slot_and_close_the_generation(stream):
    backend = FakeBackend()
    sent, held = run(backend, request(stream=stream))
    assert sent[0]["status"] == 200 and (b"[DONE]" in body_bytes(sent)) == stream
    assert held == (0, 0)


@pytest.mark.parametrize("stream", [False, True])
def test_failed_and_refused_generations_free_the_slot(stream):
    failing, refusing = FakeBackend(), FakeBackend()
    failing.fail_after = 2
    refusing.refuse = PeerError("KV budget exhausted", ErrorCode.CAPACITY)
    sent, held = run(failing, request(stream=stream))
    assert (sent[0]["status"] == 200) == stream and held == (0, 0)
    sent, held = run(refusing, request(stream=stream))
    assert sent[0]["status"] == 503 and held == (0, 0)


@pytest.mark.parametrize("outcome", ["starts", "fails", "client leaves"])
def test_a_stream_slow_to_start_is_answered_at_once_and_kept_alive(outcome):
    """A first step slower than the keep-alive interval (a long prefill, a queue): 200 and keep-alive comments at
    once, then the events, or the error event when the start fails; a client that leaves cancels the start."""
    backend = FakeBackend()
    backend.gate = asyncio.Event()
    if outcome == "fails":
        backend.fail_after = 0  # the first step fails, once the gate opens

    async def scenario():
        app = create_app(GatewaySettings(gateway_max_concurrent=2, gateway_sse_keepalive=0.05), backend=backend)
        async with app.router.lifespan_context(app):
            client = Client(app, request(stream=True))
            sent = client.sent
            await client.until(lambda body: body.count(b": keep-alive") >= 3)  # the gate is shut: nothing started
            assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
            assert b"data:" not in body_bytes(sent)
            if outcome == "client leaves":
                client.leave()
            else:
                backend.gate.set()
            await asyncio.wait_for(client.task, 5)
            return sent, (app.state.engine.active, backend.open_sessions)

    sent, held = asyncio.run(scenario())
    assert held == (0, 0)
    events = [e for e in body_bytes(sent).decode().split("\n\n") if e.startswith("data: ")]
    if outcome == "starts":
        assert events[-1] == "data: [DONE]" and "".join(
            json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[1:-1]
            if json.loads(e[6:])["choices"]).startswith("Hello")
    elif outcome == "fails":
        assert json.loads(events[0][6:])["error"]["code"] == "swarm_error" and events[-1] == "data: [DONE]"
    else:
        assert events == [] and len(backend.requests) == 1


def test_a_client_leaving_while_a_kept_alive_stream_awaits_its_next_event_closes_everything():
    """The next event is awaited in a task (with_keepalive): it is stopped and waited for before the generation is
    closed, whose clean-up awaits (as closing the peers' sessions does)."""

    class SlowToClose(FakeBackend):
        async def generate(self, request):
            try:
                async for events in super().generate(request):
                    yield events
            finally:
                await asyncio.sleep(0.05)  # as `await session.close()` does

    backend = SlowToClose()
    backend.gate = asyncio.Event()
    backend.gate.set()

    async def scenario():
        app = create_app(GatewaySettings(gateway_max_concurrent=2, gateway_sse_keepalive=0.05), backend=backend)
        async with app.router.lifespan_context(app):
            def hold_the_next_step(message: dict) -> None:
                if b"data:" in message.get("body", b""):
                    backend.gate.clear()  # the next step waits: the stream awaits its next event

            client = Client(app, request(stream=True), on_send=hold_the_next_step)
            await client.until(lambda body: b": keep-alive" in body)
            client.leave()
            await asyncio.wait_for(client.task, 5)  # no "aclose(): asynchronous generator is already running"
            return app.state.engine.active, backend.open_sessions

    assert asyncio.run(scenario()) == (0, 0)
