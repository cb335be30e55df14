"""A frame is sent in one go, and an answer taken in one go: a client that stalls or trickles either costs a peer its
session, after a deadline of seconds, never the idle timeout of minutes.

Against a real peer process (--frame-timeout 2, --open-timeout 3, --idle-timeout 120): a step frame that stops
halfway or arrives a byte at a time, and an open message sent in part, get a `idle_timeout` error after their
deadline, and everything the stream held is freed; between frames the idle timeout still applies. A client that
stops reading its answers is covered at the handler, whose writer never drains here (a real stream's buffers are
megabytes deep: filling them takes many steps and no fixed count).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm.codec import make_request, receive_message, unpack_metadata
from swarm.model.source import ModelSource
from swarm.model.span import load_span
from swarm.protocol import INFERENCE_HANDLER, PROTOCOL_VERSION, ErrorCode
from swarm.server import handler as handler_module
from swarm.server.backend import Limits, SpanBackend
from swarm.server.handler import SpanHandler, StreamLimits
from swarm.server.memory import KVBudget
from tests.e2e.conftest import poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

# Deadlines of seconds against an idle timeout of two minutes: what closed a stream is told apart by a factor of 10+.
FRAME_TIMEOUT, OPEN_TIMEOUT, IDLE_TIMEOUT = 2.0, 3.0, 120.0


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    flags = ["--frame-timeout", str(FRAME_TIMEOUT), "--open-timeout", str(OPEN_TIMEOUT),
             "--idle-timeout", str(IDLE_TIMEOUT), "--kv-budget-tokens", "2000"]
    with tiny_peer(tmp_path_factory.mktemp("frame-deadlines"), tiny_model_dir("llama"), *flags) as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def client(peer, tiny_model_dir):
    async with clients_of(peer, tiny_model_dir("llama"), 1) as made:
        yield made[0]


def frame(message) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(8, "big") + payload


OPEN = make_request({"type": "open", "version": PROTOCOL_VERSION, "session_id": "slow", "max_length": 64,
                     "batch_size": 1, "blocks": [0, 6]})


def step(position: int, tokens: int = 4):
    return make_request({"type": "step", "position": position}, (torch.randn(1, tokens, 64),))


async def reply(reader, timeout: float) -> dict:
    async with asyncio.timeout(timeout):
        return unpack_metadata((await receive_message(reader, runtime_pb2.ExpertResponse, 1 << 20)).metadata)


async def opened_session(client, peer_id):
    _, reader, writer = await client.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), INFERENCE_HANDLER)
    writer.write(frame(OPEN))
    await writer.drain()
    assert (await reply(reader, 10))["type"] == "opened"
    return reader, writer


async def nothing_held(client, peer_id):
    info = await client.peer_info(peer_id)
    return info.active_sessions == 0 and info.free_kv_tokens == info.kv_budget_tokens


@pytest.mark.parametrize("how", ["stalls", "trickles"])
async def test_a_step_frame_sent_in_part_closes_the_session_after_the_frame_timeout(peer, client, how):
    reader, writer = await opened_session(client, peer.peer)
    data = frame(step(0))
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(data[: len(data) // 2])
    await writer.drain()

    async def trickle():  # a byte every 0.2 s: never silent for long, never done in time
        for byte in data[len(data) // 2 : -1]:
            await asyncio.sleep(0.2)
            writer.write(bytes([byte]))
            await writer.drain()

    trickler = asyncio.ensure_future(trickle() if how == "trickles" else asyncio.sleep(0))
    try:
        answer = await reply(reader, timeout=IDLE_TIMEOUT / 4)
    finally:
        trickler.cancel()
    waited = loop.time() - started
    writer.close()
    assert answer["type"] == "error" and answer["code"] == ErrorCode.TIMEOUT, answer
    assert "frame" in answer["message"]
    assert FRAME_TIMEOUT - 0.5 <= waited < IDLE_TIMEOUT / 4
    await poll(lambda: nothing_held(client, peer.peer))


async def test_an_open_message_sent_in_part_is_closed_after_the_open_timeout(peer, client):
    _, reader, writer = await client.p2p.call_binary_stream_handler(PeerID.from_base58(peer.peer), INFERENCE_HANDLER)
    data = frame(OPEN)
    writer.write(data[: len(data) // 2])
    await writer.drain()
    answer = await reply(reader, timeout=IDLE_TIMEOUT / 4)
    writer.close()
    assert answer["type"] == "error" and answer["code"] == ErrorCode.TIMEOUT, answer
    await poll(lambda: nothing_held(client, peer.peer))
    assert (await client.peer_info(peer.peer)).pending_streams == 0


async def test_between_frames_the_idle_timeout_applies_not_the_frame_timeout(peer, client):
    reader, writer = await opened_session(client, peer.peer)
    writer.write(frame(step(0)))
    await writer.drain()
    assert (await reply(reader, 10))["type"] == "result"
    await asyncio.sleep(3 * FRAME_TIMEOUT)  # silent between frames: well past the frame deadline
    writer.write(frame(step(4, 1)))
    await writer.drain()
    assert (await reply(reader, 10))["type"] == "result"
    writer.close()
    await poll(lambda: nothing_held(client, peer.peer))


class StuckWriter:
    """A stream whose client never reads: the first answer is taken, then writes never drain."""

    def __init__(self):
        self.sent = 0

    def write(self, data):
        pass

    async def drain(self):
        self.sent += 1
        if self.sent > 2:  # 'opened' and one result went out
            await asyncio.Event().wait()

    def can_write_eof(self):
        return False

    def close(self):
        pass


async def test_a_client_that_stops_reading_loses_its_session_after_the_frame_timeout(tiny_model_dir):
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    backend = SpanBackend(span, Limits(max_sessions=4, max_length=64), KVBudget(512))
    handler = SpanHandler(backend, lambda: None,  # type: ignore[arg-type, return-value]
                          StreamLimits(idle_timeout=IDLE_TIMEOUT, frame_timeout=0.5))
    reader = asyncio.StreamReader()
    for message in (OPEN, step(0), step(4, 1), step(5, 1)):
        reader.feed_data(frame(message))
    info = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "slow-reader"))
    try:
        async with asyncio.timeout(IDLE_TIMEOUT / 4):  # the frame deadline (0.5 s), not the idle timeout (120 s)
            await handler.handle_stream(info, reader, StuckWriter())  # type: ignore[arg-type]
        assert not backend.sessions and backend.budget.free == 512
    finally:
        backend.shutdown()


class RecordingWriter:
    """A stream that takes everything at once and records how the peer ends it."""

    def __init__(self):
        self.data = b""
        self.ends: list[str] = []

    def write(self, data):
        self.data += data

    async def drain(self):
        pass

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.ends.append("half-close")

    def close(self):
        self.ends.append("close")


@pytest.mark.parametrize("client_hangs_up", [True, False])
async def test_a_refused_stream_is_ended_by_the_client_or_after_the_linger_never_first_by_the_peer(
        tiny_model_dir, monkeypatch, client_hangs_up):
    # Through p2pd, a close or half-close from the peer first makes the daemon reset the stream, and a reset makes the
    # client's side drop the error frame it has received but not read yet (seen: 4 of 200 refusals lost under load).
    monkeypatch.setattr(handler_module, "LINGER_SECONDS", 1.0)
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    backend = SpanBackend(span, Limits(max_sessions=4, max_length=64), KVBudget(512))
    handler = SpanHandler(backend, lambda: None,  # type: ignore[arg-type, return-value]
                          StreamLimits(idle_timeout=IDLE_TIMEOUT))
    reader, writer = asyncio.StreamReader(), RecordingWriter()
    reader.feed_data(frame(step(0)))  # a step before any open message: refused
    info = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "refused"))
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(handler.handle_stream(info, reader, writer))  # type: ignore[arg-type]

    async def answered():
        return bool(writer.data)

    try:
        await poll(answered, timeout=5)
        answered_at = loop.time()
        await asyncio.sleep(0.3)
        assert writer.ends == []  # the error is out; the stream stays open while the client may still read it
        if client_hangs_up:
            reader.feed_eof()
        async with asyncio.timeout(5):
            await task
        assert writer.ends == ["close"]
        if not client_hangs_up:  # a client that never hangs up is closed on after the linger
            assert loop.time() - answered_at >= 1.0 - 0.1
        sent = asyncio.StreamReader()
        sent.feed_data(writer.data)
        answer = unpack_metadata((await receive_message(sent, runtime_pb2.ExpertResponse, 1 << 20)).metadata)
        assert answer["type"] == "error" and answer["code"] == ErrorCode.BAD_REQUEST, answer
    finally:
        task.cancel()
        backend.shutdown()


async def test_a_push_stream_cancelled_at_shutdown_ends_quietly_and_is_forgotten(tiny_model_dir):
    """A peer shutting down cancels its connections' tasks; Python 3.11's asyncio then logs a connection task that
    ended cancelled as an error with a traceback (two per push stream at every SIGTERM): the push handler ends."""
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    backend = SpanBackend(span, Limits(max_sessions=4, max_length=64), KVBudget(512))
    handler = SpanHandler(backend, lambda: None,  # type: ignore[arg-type, return-value]
                          StreamLimits(idle_timeout=IDLE_TIMEOUT))
    writer = RecordingWriter()
    info = SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: "previous-peer"))
    try:
        task = asyncio.ensure_future(handler.handle_push(info, asyncio.StreamReader(), writer))  # type: ignore
        await asyncio.sleep(0.05)
        assert handler.push_streams["previous-peer"] == 1
        task.cancel()
        await asyncio.wait([task])
        assert not task.cancelled() and task.exception() is None  # what asyncio's connection callback asks
        assert not handler.push_streams and writer.ends == ["close"]
    finally:
        backend.shutdown()
