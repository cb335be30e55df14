"""Forked sessions (swarm.protocol: `fork`) start from the same KV as their source, and cost only their sender.

Against a real peer process: a session opened with `fork` [handle, tokens] computes its next steps with the same
bits as its source does from that position, the source goes on untouched; a fork that names another client's
session, one over other blocks, an unknown handle, more tokens than the source holds, or that is malformed, is
refused with bad_request on the new stream only (the source steps on), and a refused fork frees what it reserved.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import torch
from hivemind.p2p import PeerID

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.session import InferenceSession
from swarm.client.stream import PeerStream
from swarm.codec import make_request
from swarm.protocol import INFERENCE_HANDLER, PROTOCOL_VERSION, ErrorCode, OpenRequest, PeerError
from tests.e2e.conftest import poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

H = 64


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    with tiny_peer(tmp_path_factory.mktemp("fork"), tiny_model_dir("llama"), "--kv-budget-tokens", "4000") as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def clients(peer, tiny_model_dir):
    async with clients_of(peer, tiny_model_dir("llama"), 2) as made:
        yield made


async def open_stream(client: SwarmClient, peer_id: str, start: int = 0, end: int = 6,
                      fork: tuple[int, int, str] | None = None) -> PeerStream:
    span = next(s for s in await client.spans() if s.peer_id == peer_id)
    request = OpenRequest(uuid.uuid4().hex, max_length=32, batch_size=1, start=start, end=end, fork=fork)
    return await PeerStream.open(client.p2p, Link(span, start, end), request, timeout=30)


async def free(client: SwarmClient, peer_id: str, streams: list[PeerStream]) -> None:
    for stream in streams:
        await stream.close()

    async def none_left():
        info = await client.peer_info(peer_id)
        return info.active_sessions == 0 and info.free_kv_tokens == info.kv_budget_tokens

    await poll(none_left)


async def test_a_fork_computes_what_its_source_computes_from_there(peer, clients):
    client = clients[0]
    g = torch.Generator().manual_seed(0)
    first, rest, later = torch.randn(1, 5, H, generator=g), torch.randn(1, 3, H, generator=g), torch.randn(1, 1, H)
    source = await open_stream(client, peer.peer)
    await source.step(first, 0, timeout=30)
    forked = await open_stream(client, peer.peer, fork=(source.handle, 5, source.session_id))
    assert forked.forked == 5
    from_fork = await forked.step(rest, 5, timeout=30)
    assert torch.equal(from_fork, await source.step(rest, 5, timeout=30))  # the same cache and inputs: same bits
    # the fork's cache is its own: the source rewinds to 2 and steps other inputs; the fork goes on as a session that
    # computed `first` and `rest` itself does
    await source.step(torch.randn(1, 4, H), 2, timeout=30)
    fresh = await open_stream(client, peer.peer)
    await fresh.step(first, 0, timeout=30)
    assert torch.equal(await fresh.step(rest, 5, timeout=30), from_fork)
    assert torch.equal(await forked.step(later, 8, timeout=30), await fresh.step(later, 8, timeout=30))
    await free(client, peer.peer, [source, forked, fresh])


async def test_a_session_forks_through_the_client_with_its_inputs_router_and_position(peer, clients):
    """InferenceSession.fork: the new session has the parent's first inputs (for replay), its router and policy
    (failover, verification), and goes on alone when the parent is closed; a parent a check found wrong is not
    forked."""
    client = clients[0]
    hidden = torch.randn(1, 6, H, generator=torch.Generator().manual_seed(7))
    parent = await client.inference_session(32)
    await parent.step(hidden[:, :4])
    forked = await InferenceSession.fork(parent, 3, 32)
    assert forked is not None and forked.position == 3 and forked.router is parent.router is client.router
    assert torch.equal(forked._inputs[0], parent._inputs[0][:, :3])
    await parent.close()
    out = await forked.step(hidden[:, 3:])
    async with await client.inference_session(32) as fresh:  # the parent's cache, made as the parent made it
        await fresh.step(hidden[:, :4])
        assert torch.equal(await fresh.step(hidden[:, 3:], position=3), out)
    async with await client.inference_session(32) as other:
        await other.step(hidden[:, :4])
        verdict = PeerError("found wrong", ErrorCode.INTERNAL, peer.peer)
        other._found = verdict  # a check's verdict, the peer not replaced yet: no fork of what it computed
        assert await InferenceSession.fork(other, 3, 32) is None
        other._found = None
        assert await InferenceSession.fork(other, 5, 32) is None  # and never more than it holds
        handle, other.streams[0].handle = other.streams[0].handle, None  # a peer that names no session handles
        assert await InferenceSession.fork(other, 3, 32) is None
        other.streams[0].handle = handle
        # a check still running when the fork is made: its verdict reaches the fork too
        running = asyncio.get_running_loop().create_future()
        other._background_check = running  # type: ignore[assignment]
        child = await InferenceSession.fork(other, 3, 32)
        assert child is not None and child.repair_due is None
        other._found = verdict
        running.set_result(None)
        await asyncio.sleep(0)
        assert child.repair_due is verdict
        other._found, other._background_check = None, None
        await child.close()
    await forked.close()
    await free(client, peer.peer, [])


@pytest.mark.parametrize("case", ["theirs", "other_blocks", "unknown", "stale", "too_many", "malformed"])
async def test_a_bad_fork_is_refused_and_costs_only_its_stream(peer, clients, case):
    mine, theirs = clients
    source = await open_stream(mine, peer.peer)
    await source.step(torch.randn(1, 4, H), 0, timeout=30)
    other = await open_stream(theirs if case == "theirs" else mine, peer.peer, end=3 if case == "other_blocks" else 6)
    await other.step(torch.randn(1, 4, H), 0, timeout=30)
    if case == "malformed":  # an open frame written by hand: the fork's tokens are not a number
        span = next(s for s in await mine.spans() if s.peer_id == peer.peer)
        _, reader, writer = await mine.p2p.call_binary_stream_handler(PeerID.from_base58(peer.peer),
                                                                      INFERENCE_HANDLER)
        raw = PeerStream(Link(span, 0, 6), reader, writer)
        await raw._send(make_request({"type": "open", "version": PROTOCOL_VERSION, "session_id": "m",
                                      "max_length": 32, "batch_size": 1, "blocks": [0, 6],
                                      "fork": [source.handle, "all", source.session_id]}))
        with pytest.raises(PeerError) as refused:
            await raw._receive(30, expected="opened")
        await raw.close()
    else:
        # stale: the source's handle under another session's id (a handle a restarted peer gave a new session)
        handle, tokens, name = {"theirs": (other.handle, 2, other.session_id),
                                "other_blocks": (other.handle, 2, other.session_id),
                                "unknown": (10**12, 2, source.session_id), "stale": (source.handle, 2, "an-old-one"),
                                "too_many": (source.handle, 5, source.session_id)}[case]
        with pytest.raises(PeerError) as refused:
            await open_stream(mine, peer.peer, fork=(handle, tokens, name))
    assert refused.value.code == ErrorCode.BAD_REQUEST
    # nothing else was touched: the source and the other session step on at their positions
    assert (await source.step(torch.randn(1, 1, H), 4, timeout=30)).shape == (1, 1, H)
    assert (await other.step(torch.randn(1, 1, H), 4, timeout=30)).shape == (1, 1, H)
    await other.close()
    await free(mine, peer.peer, [source])
