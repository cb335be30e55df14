"""Group frames (swarm.protocol: `group_step`) cost only their sender, and only the rows that are wrong.

Against a real peer process: a group frame steps each row as its own session's step (the same outputs as stepping
that session alone); a row naming a session that is not the sender's, over other blocks, unknown, already stepping,
at a bad position or with NaN is refused alone (its code in its place) while the other rows are computed; a
malformed frame (a session named twice, more rows than MAX_GROUP_ROWS, hidden states that do not match the rows) is
an error of the carrying stream only; a session whose steps come only in group frames is not closed as idle.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.stream import PeerStream
from swarm.codec import make_request
from swarm.protocol import MAX_GROUP_ROWS, ErrorCode, OpenRequest, PeerError
from tests.e2e.conftest import poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

IDLE_TIMEOUT = 8.0
BATCH_WAIT = 3.0
PROMPT = 3
H = 64


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    flags = ["--idle-timeout", str(IDLE_TIMEOUT), "--batch-wait-ms", str(BATCH_WAIT * 1000),
             "--kv-budget-tokens", "4000"]
    with tiny_peer(tmp_path_factory.mktemp("group-frames"), tiny_model_dir("llama"), *flags) as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def clients(peer, tiny_model_dir):
    async with clients_of(peer, tiny_model_dir("llama"), 2) as made:
        yield made


async def sessions(client: SwarmClient, peer_id: str, prompts: list[torch.Tensor], start: int = 0,
                   end: int = 6) -> list[PeerStream]:
    """One session per prompt over blocks [start, end) of the peer, each prompt prefilled."""
    span = next(s for s in await client.spans() if s.peer_id == peer_id)
    streams = []
    for i, prompt in enumerate(prompts):
        request = OpenRequest(f"g{i}", max_length=32, batch_size=1, start=start, end=end)
        stream = await PeerStream.open(client.p2p, Link(span, start, end), request, timeout=30)
        assert stream.handle is not None  # this peer names its sessions for group frames
        await stream.step(prompt, 0, timeout=30)
        streams.append(stream)
    return streams


def prompts(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, PROMPT, H, generator=g) for _ in range(count)]


async def close_all(streams: list[PeerStream], client: SwarmClient, peer_id: str) -> None:
    for stream in streams:
        await stream.close()

    async def freed():
        return (await client.peer_info(peer_id)).active_sessions == 0

    await poll(freed)


async def group(carrier: PeerStream, rows: torch.Tensor, handles: list, positions: list[int], size: int = 0):
    """A group frame of `size` rows to take (default: all) → (outputs, rows taken)."""
    return await carrier.group_step(rows, handles, positions, ("round", size or len(handles)), timeout=30)


def alone(stream: PeerStream, hidden: torch.Tensor, position: int):
    """A step in the stream's own frame, as a group of one (it waits for no other session's step)."""
    return stream.step(hidden, position, timeout=30, group=("alone", 1))


async def test_a_group_frame_steps_every_row_as_its_session_alone(peer, clients):
    client = clients[0]
    grouped = await sessions(client, peer.peer, prompts(3, 1))
    singles = await sessions(client, peer.peer, prompts(3, 1))
    g = torch.Generator().manual_seed(2)
    for t in range(3):
        rows = torch.randn(3, 1, H, generator=g)
        out, taken = await group(grouped[t % 3], rows, [s.handle for s in grouped], [PROMPT + t] * 3)
        assert taken == [True] * 3
        for j, stream in enumerate(singles):
            expected = await alone(stream, rows[j : j + 1], PROMPT + t)
            torch.testing.assert_close(out[j : j + 1], expected, atol=1e-5, rtol=0)
    # the members' own streams go on from where the group frames left them
    after = await alone(grouped[1], torch.ones(1, 1, H), PROMPT + 3)
    torch.testing.assert_close(after, await alone(singles[1], torch.ones(1, 1, H), PROMPT + 3), atol=1e-5, rtol=0)
    await close_all(grouped + singles, client, peer.peer)


async def test_rows_that_are_not_the_senders_to_take_are_refused_alone(peer, clients):
    a, b = clients
    mine = await sessions(a, peer.peer, prompts(3, 3))
    other_blocks = await sessions(a, peer.peer, prompts(1, 4), start=0, end=3)
    theirs = await sessions(b, peer.peer, prompts(1, 5))
    rows = torch.randn(7, 1, H)
    rows[5, 0, 0] = float("nan")
    handles = [mine[0].handle, theirs[0].handle, other_blocks[0].handle, 10**12, mine[1].handle, mine[2].handle,
               "x"]
    positions = [PROMPT, PROMPT, PROMPT, PROMPT, PROMPT + 7, PROMPT, PROMPT]
    out, taken = await group(mine[0], rows, handles, positions, size=1)
    # computed: mine[0]; refused: b's session, one over other blocks, an unknown handle, a position past the cache,
    # a row with NaN, a handle that is not an integer
    assert taken == [True, False, False, False, False, False, False]
    assert torch.isfinite(out[0]).all() and not out[1:].any()
    # nothing of them was touched: b's session steps at its position, mine[1] too, and the carrier goes on
    assert (await alone(theirs[0], torch.randn(1, 1, H), PROMPT)).shape == (1, 1, H)
    _, taken = await group(mine[0], torch.randn(2, 1, H), [mine[0].handle, mine[1].handle], [PROMPT + 1, PROMPT])
    assert taken == [True, True]
    for stream in theirs:
        await stream.close()
    await close_all(mine + other_blocks, a, peer.peer)


async def test_a_row_of_a_session_with_a_step_in_flight_is_refused(peer, clients):
    client = clients[0]
    first, second = await sessions(client, peer.peer, prompts(2, 6))
    # a step tagged as one of a group of 2 whose other member never comes: it waits BATCH_WAIT for its round
    waiting = asyncio.ensure_future(first.step(torch.randn(1, 1, H), PROMPT, timeout=30, group=("late", 2)))
    await asyncio.sleep(0.5)
    _, taken = await group(second, torch.randn(2, 1, H), [first.handle, second.handle], [PROMPT, PROMPT], size=1)
    assert taken == [False, True]
    assert (await waiting).shape == (1, 1, H)  # the step in flight is answered as usual
    await close_all([first, second], client, peer.peer)


@pytest.mark.parametrize("frame", ["twice", "too_many", "shape", "no_handles", "two_tensors"])
async def test_a_malformed_group_frame_ends_only_its_carrying_stream(peer, clients, frame):
    client = clients[0]
    carrier, member = await sessions(client, peer.peer, prompts(2, 7))
    handles, positions = [carrier.handle, member.handle], [PROMPT, PROMPT]
    metadata = {"type": "group_step", "handles": handles, "positions": positions, "group": ["r", 2]}
    tensors: tuple[torch.Tensor, ...] = (torch.randn(2, 1, H),)
    if frame == "twice":
        metadata.update(handles=[carrier.handle, carrier.handle])
    elif frame == "too_many":
        metadata.update(handles=list(range(MAX_GROUP_ROWS + 1)), positions=[PROMPT] * (MAX_GROUP_ROWS + 1))
        tensors = (torch.randn(MAX_GROUP_ROWS + 1, 1, H),)
    elif frame == "shape":
        tensors = (torch.randn(1, 2, H),)
    elif frame == "no_handles":
        del metadata["handles"]
    else:
        tensors = (torch.randn(2, 1, H), torch.randn(2, 1, H))
    carrier.expect(tensors[0])
    await carrier._send(make_request(metadata, tensors))
    with pytest.raises(PeerError) as refused:
        await carrier._receive(10, expected="result")
    assert refused.value.code == ErrorCode.BAD_REQUEST, refused.value
    # the other session of the same client goes on
    assert (await alone(member, torch.randn(1, 1, H), PROMPT)).shape == (1, 1, H)
    await close_all([carrier, member], client, peer.peer)


async def test_a_session_stepped_only_in_group_frames_is_not_closed_as_idle(peer, clients):
    client = clients[0]
    carrier, member, idle = await sessions(client, peer.peer, prompts(3, 8))
    loop = asyncio.get_running_loop()
    started, position = loop.time(), PROMPT
    while loop.time() - started < 1.5 * IDLE_TIMEOUT:  # only the carrier's stream carries frames
        _, taken = await group(carrier, torch.randn(2, 1, H), [carrier.handle, member.handle], [position] * 2)
        assert taken == [True, True]
        position += 1
        await asyncio.sleep(0.5)
    assert (await alone(member, torch.randn(1, 1, H), position)).shape == (1, 1, H)
    with pytest.raises(PeerError) as closed:  # a session that got no step at all was closed as idle meanwhile
        await alone(idle, torch.randn(1, 1, H), PROMPT)
    assert closed.value.code == ErrorCode.TIMEOUT, closed.value
    await close_all([carrier, member, idle], client, peer.peer)


async def test_a_frame_of_the_most_rows_all_refused_is_answered_in_one_frame_the_client_reads(peer, clients):
    client = clients[0]
    (carrier,) = await sessions(client, peer.peer, prompts(1, 9))
    handles = list(range(10**9, 10**9 + MAX_GROUP_ROWS))  # nobody's
    out, taken = await group(carrier, torch.randn(MAX_GROUP_ROWS, 1, H), handles, [PROMPT] * MAX_GROUP_ROWS, size=1)
    assert taken == [False] * MAX_GROUP_ROWS and not out.any()
    assert (await alone(carrier, torch.randn(1, 1, H), PROMPT)).shape == (1, 1, H)
    await close_all([carrier], client, peer.peer)
