"""Before a stream is a session it costs a peer little, and not for long.

Against a real peer process: its first frame (the open message: metadata only) is refused at its header past a few
KiB; one client may keep only --max-client-pending streams that are not sessions yet, all clients together
--max-pending-streams; a stream that does not send its open message within --open-timeout is closed. The peer's
count of such streams is read from its info RPC (`pending_streams`).
"""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm.client import SwarmClient
from swarm.codec import receive_message, unpack_metadata
from swarm.protocol import INFERENCE_HANDLER, ErrorCode
from tests.e2e.conftest import poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

# A stream closed for its open deadline (6 s) is told so well before the idle timeout (120 s) that used to apply.
OPEN_TIMEOUT, IDLE_TIMEOUT = 6.0, 120.0
CLIENT_PENDING, ALL_PENDING = 3, 5


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    flags = ["--open-timeout", str(OPEN_TIMEOUT), "--idle-timeout", str(IDLE_TIMEOUT),
             "--max-client-pending", str(CLIENT_PENDING), "--max-pending-streams", str(ALL_PENDING),
             "--kv-budget-tokens", "2000"]
    with tiny_peer(tmp_path_factory.mktemp("peer-streams"), tiny_model_dir("llama"), *flags) as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def clients(peer, tiny_model_dir):
    """Two clients (two peer ids) of the swarm."""
    async with clients_of(peer, tiny_model_dir("llama"), 2) as made:
        yield made


async def raw_stream(client: SwarmClient, peer_id: str):
    _, reader, writer = await client.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), INFERENCE_HANDLER)
    return reader, writer


async def reply(reader, timeout: float) -> dict:
    """The peer's next message (an error, here), within `timeout` seconds."""
    async with asyncio.timeout(timeout):
        return unpack_metadata((await receive_message(reader, runtime_pb2.ExpertResponse, 1 << 20)).metadata)


async def pending(client: SwarmClient, peer_id: str) -> int:
    return (await client.peer_info(peer_id)).pending_streams


async def test_a_first_frame_larger_than_an_open_message_is_refused_at_its_header(peer, clients):
    reader, writer = await raw_stream(clients[0], peer.peer)
    # 64 KiB: far below a step's limit (megabytes), far above an open message's metadata (4 KiB at most)
    writer.write(b"\x00" + (64 << 10).to_bytes(8, "big") + b"a few bytes of it")
    await writer.drain()
    answer = await reply(reader, timeout=OPEN_TIMEOUT / 2)  # at the header: not after a deadline
    writer.close()
    assert answer["type"] == "error" and answer["code"] == ErrorCode.BAD_REQUEST, answer
    assert "exceeds the limit" in answer["message"]
    await poll(lambda: _nothing_held(clients[0], peer.peer))


async def test_a_stream_that_never_sends_its_open_message_is_closed_after_the_open_timeout(peer, clients):
    loop = asyncio.get_running_loop()
    started = loop.time()
    reader, writer = await raw_stream(clients[0], peer.peer)
    await poll(lambda: _pending_is(clients[0], peer.peer, 1))
    answer = await reply(reader, timeout=IDLE_TIMEOUT / 4)
    waited = loop.time() - started
    writer.close()
    assert answer["type"] == "error" and answer["code"] == ErrorCode.TIMEOUT, answer
    assert OPEN_TIMEOUT - 0.5 <= waited < IDLE_TIMEOUT / 4  # its deadline, not the idle timeout, and not before
    await poll(lambda: _nothing_held(clients[0], peer.peer))


async def test_streams_not_yet_sessions_are_capped_per_client_and_in_all_and_others_still_get_sessions(peer, clients):
    a, b = clients
    held = []
    for _ in range(CLIENT_PENDING):  # client a: as many silent streams as one client may keep
        held.append(await raw_stream(a, peer.peer))
    await poll(lambda: _pending_is(a, peer.peer, CLIENT_PENDING))
    reader, writer = await raw_stream(a, peer.peer)  # one more from a: refused at once, for capacity
    answer = await reply(reader, timeout=OPEN_TIMEOUT)
    writer.close()
    assert answer["type"] == "error" and answer["code"] == ErrorCode.CAPACITY, answer
    # client b is not held to a's cap: it keeps silent streams up to the peer's cap of all clients together...
    for _ in range(ALL_PENDING - CLIENT_PENDING):
        held.append(await raw_stream(b, peer.peer))
    await poll(lambda: _pending_is(a, peer.peer, ALL_PENDING))
    reader, writer = await raw_stream(b, peer.peer)  # ...and no further
    answer = await reply(reader, timeout=OPEN_TIMEOUT)
    writer.close()
    assert answer["type"] == "error" and answer["code"] == ErrorCode.CAPACITY, answer
    # every silent stream is closed at its open deadline; then b opens a session and generates
    for silent_reader, _ in held:
        assert (await reply(silent_reader, timeout=IDLE_TIMEOUT / 4))["code"] == ErrorCode.TIMEOUT
    for _, silent_writer in held:
        silent_writer.close()
    await poll(lambda: _nothing_held(a, peer.peer))
    tokens = [t async for t in b.generate([5, 6, 7], 4, stop_token_ids=[])]
    assert len(tokens) == 4
    await poll(lambda: _nothing_held(a, peer.peer))


async def _pending_is(client, peer_id, count):
    return await pending(client, peer_id) == count


async def _nothing_held(client, peer_id):
    info = await client.peer_info(peer_id)
    return info.pending_streams == 0 and info.active_sessions == 0 and info.free_kv_tokens == info.kv_budget_tokens

