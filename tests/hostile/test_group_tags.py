"""A step's `group` tag can make only its own client's steps wait.

Against a real peer process with --batch-wait-ms 15000: a group's size counts at most the sender's own sessions on
the peer, a group id is the sender's own (another client naming it neither completes nor enlarges it), and a group
still missing members holds back no other client's steps. Each wait the peer must not make would last the 15 s
batch wait; what it must do takes a tiny model's step (milliseconds): the bound between them is 5 s.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.stream import PeerStream
from swarm.protocol import OpenRequest
from tests.e2e.conftest import poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

BATCH_WAIT = 15.0
PROMPT = 3  # tokens prefilled before the tagged decode steps


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    flags = ["--batch-wait-ms", str(BATCH_WAIT * 1000), "--kv-budget-tokens", "4000"]
    with tiny_peer(tmp_path_factory.mktemp("group-tags"), tiny_model_dir("llama"), *flags) as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def clients(peer, tiny_model_dir):
    async with clients_of(peer, tiny_model_dir("llama"), 2) as made:
        yield made


async def sessions(client: SwarmClient, peer_id: str, count: int) -> list[PeerStream]:
    """`count` sessions of the whole model on the peer, each with a short prompt cached."""
    span = next(s for s in await client.spans() if s.peer_id == peer_id)
    streams = []
    for i in range(count):
        request = OpenRequest(f"s{i}", max_length=32, batch_size=1, start=0, end=6)
        stream = await PeerStream.open(client.p2p, Link(span, 0, 6), request, timeout=30)
        await stream.step(torch.randn(1, PROMPT, 64), 0, timeout=30)
        streams.append(stream)
    return streams


def decode(stream: PeerStream, group: tuple[str, int] | None, position: int = PROMPT) -> asyncio.Future:
    return asyncio.ensure_future(stream.step(torch.randn(1, 1, 64), position, timeout=3 * BATCH_WAIT, group=group))


async def closed(streams, client, peer_id):
    for stream in streams:
        await stream.close()

    async def freed():
        info = await client.peer_info(peer_id)
        return info.active_sessions == 0

    await poll(freed)


async def test_a_group_larger_than_its_senders_sessions_does_not_make_the_peer_wait(peer, clients):
    (mine,) = await sessions(clients[0], peer.peer, 1)
    started = asyncio.get_running_loop().time()
    await decode(mine, ("forged", 1024))
    assert asyncio.get_running_loop().time() - started < 5  # not the 15 s batch wait
    await closed([mine], clients[0], peer.peer)


async def test_a_group_missing_members_holds_back_only_its_own_clients_steps(peer, clients):
    a_sessions = await sessions(clients[0], peer.peer, 2)
    (b_session,) = await sessions(clients[1], peer.peer, 1)
    loop = asyncio.get_running_loop()
    a_step = decode(a_sessions[0], ("a-round", 2))  # its second member never comes: it waits, for itself
    await asyncio.sleep(0.2)
    started = loop.time()
    await decode(b_session, ("b-round", 1))
    assert loop.time() - started < 5 and not a_step.done()  # b went ahead; a still waits for its own member
    await a_step  # after a's batch wait, without the member that never came
    await closed([*a_sessions, b_session], clients[0], peer.peer)


async def test_another_client_cannot_complete_or_enlarge_a_clients_group(peer, clients):
    a_sessions = await sessions(clients[0], peer.peer, 2)
    (b_session,) = await sessions(clients[1], peer.peer, 1)
    loop = asyncio.get_running_loop()
    first = decode(a_sessions[0], ("round-7", 2))
    await asyncio.sleep(0.2)
    # b names a's group: with its size it would complete a's group without a's second member (which would then wait
    # for members already computed); with a size of 1024 it would make a's next group wait for members never coming
    await asyncio.wait_for(decode(b_session, ("round-7", 1)), 5)
    started = loop.time()
    second = decode(a_sessions[1], ("round-7", 2))
    await asyncio.wait_for(asyncio.gather(first, second), 5)  # a's group completes with its own two members
    assert loop.time() - started < 5
    await asyncio.wait_for(decode(b_session, ("round-8", 1024), PROMPT + 1), 5)
    third = [decode(s, ("round-8", 2), PROMPT + 1) for s in a_sessions]
    await asyncio.wait_for(asyncio.gather(*third), 5)
    await closed([*a_sessions, b_session], clients[0], peer.peer)
