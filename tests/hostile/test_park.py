"""Parked sessions (swarm.protocol: `park`) against a real peer process (--max-sessions 2, --admission-wait 2): a
client's parked session is freed at once when a new session needs its slot (the new one does not wait), its stream
ends with a `capacity` error the client can see before it steps again; a step or an unpark (answered) un-parks a
session, so that a full peer with nothing parked makes the next session wait and refuses it; a parked session is
announced as free capacity; a park frame that carries a tensor is a bad request of its own stream only."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from swarm.client.routing import Link
from swarm.client.stream import PeerStream
from swarm.codec import make_request
from swarm.protocol import ErrorCode, OpenRequest, PeerError
from tests.e2e.conftest import poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

ADMISSION_WAIT = 2.0


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    flags = ["--max-sessions", "2", "--admission-wait", str(ADMISSION_WAIT)]
    with tiny_peer(tmp_path_factory.mktemp("park"), tiny_model_dir("llama"), *flags) as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def client(peer, tiny_model_dir):
    async with clients_of(peer, tiny_model_dir("llama"), 1) as made:
        yield made[0]


async def ended(stream: PeerStream) -> bool:
    return stream.ended


async def open_stream(client, peer_id: str) -> PeerStream:
    span = next(s for s in await client.spans() if s.peer_id == peer_id)
    request = OpenRequest(uuid.uuid4().hex, max_length=32, batch_size=1, start=0, end=6)
    stream = await PeerStream.open(client.p2p, Link(span, 0, 6), request, timeout=30)
    await stream.step(torch.randn(1, 4, 64), 0, timeout=30)
    return stream


async def test_a_parked_session_makes_room_at_once_and_a_step_unparks_it(peer, client):
    cache, live = await open_stream(client, peer.peer), await open_stream(client, peer.peer)
    assert cache.parks and live.parks  # the peer said it takes park frames
    await cache.park()
    await live.park()
    await live.step(torch.randn(1, 1, 64), 4, timeout=30)  # in use again: not to be freed

    async def announced():  # the parked session is announced as free capacity, not load
        info = await client.peer_info(peer.peer)
        return info.active_sessions == 1 and info.free_kv_tokens == info.kv_budget_tokens - 32  # live's (max_length 32)

    await poll(announced)
    start = time.monotonic()
    new = await open_stream(client, peer.peer)  # the peer is full: the parked one goes
    assert time.monotonic() - start < ADMISSION_WAIT
    await poll(lambda: ended(cache))  # the client can tell before it steps again
    with pytest.raises(PeerError, match="parked session was freed") as info:
        await cache.step(torch.randn(1, 1, 64), 4, timeout=30)
    assert info.value.code == ErrorCode.CAPACITY
    assert not live.ended and not new.ended
    await new.park()
    await new.unpark(timeout=30)  # taken back: answered once the peer will not free it
    start = time.monotonic()
    with pytest.raises(PeerError, match="maximum of 2 sessions") as info:  # nothing parked: waits, then refused
        await open_stream(client, peer.peer)
    assert info.value.code == ErrorCode.CAPACITY and time.monotonic() - start >= ADMISSION_WAIT - 0.1
    for stream in (live, new):
        out = await stream.step(torch.randn(1, 1, 64), 5 if stream is live else 4, timeout=30)
        assert out.shape == (1, 1, 64)
        await stream.close()


async def test_a_park_frame_with_a_tensor_is_a_bad_request_of_its_stream_only(peer, client):
    bad, good = await open_stream(client, peer.peer), await open_stream(client, peer.peer)
    await bad._send(make_request({"type": "park"}, (torch.zeros(1, 1, 64),)))
    await poll(lambda: ended(bad))
    with pytest.raises(PeerError, match="carries no tensor") as info:
        await bad.step(torch.randn(1, 1, 64), 4, timeout=30)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert (await good.step(torch.randn(1, 1, 64), 4, timeout=30)).shape == (1, 1, 64)
    await good.close()
