"""Server-to-server push, the peer's side without a network: a session's inputs stay bounded and in order, and a
next peer that cannot be reached costs the pushing peer nothing but dropped pushes."""

from __future__ import annotations

import asyncio

import torch

from swarm.protocol import Hop
from swarm.server import push
from swarm.server.push import Input, Inputs, PushedStep, Pusher


def pushed(step: int) -> PushedStep:
    return PushedStep(step, step - 1, None, [], torch.zeros(1, 1, 4))


async def test_inputs_keep_arrival_order_and_drop_pushes_beyond_the_bound():
    inputs = Inputs(max_client=2)
    await inputs.from_client(Input(request=None))
    assert inputs.from_push(pushed(1)) and inputs.from_push(pushed(2))
    assert not inputs.from_push(pushed(3)), "a third waiting push is dropped"
    order = [await inputs.get() for _ in range(3)]
    assert [item.pushed.step if item.pushed else "client" for item in order] == ["client", 1, 2]
    assert inputs.from_push(pushed(4)), "taken pushes make room again"


async def test_a_client_reader_waits_for_room():
    inputs = Inputs(max_client=1)
    await inputs.from_client(Input(request=None))
    second = asyncio.ensure_future(inputs.from_client(Input(request=None)))
    await asyncio.sleep(0.01)
    assert not second.done(), "the reader waits while the session has a client frame untaken"
    await inputs.get()
    await asyncio.wait_for(second, 1)


class UnreachableP2P:
    def __init__(self):
        self.calls = 0

    async def call_binary_stream_handler(self, peer_id, handler):
        self.calls += 1
        raise ConnectionError("no route")


async def test_an_unreachable_next_peer_drops_pushes_and_is_retried_only_later():
    p2p = UnreachableP2P()
    pusher = Pusher(p2p)  # type: ignore[arg-type]
    hop = Hop("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "a" * 32, 1)
    for _ in range(5):
        pusher.push([hop], 0, None, torch.zeros(1, 1, 4))  # never blocks the step that pushes
    await asyncio.sleep(0.05)
    assert p2p.calls == 1, f"one dial, not one per push (RETRY_AFTER {push.RETRY_AFTER} s)"
    assert pusher.dropped == 5 and pusher.sent == 0
    assert not pusher.channels, "a peer that cannot be reached holds no channel"
    pusher.push([hop], 0, None, torch.zeros(1, 1, 4))
    await asyncio.sleep(0.05)
    assert p2p.calls == 1 and pusher.dropped == 6, "and is not dialled again before RETRY_AFTER"
    await pusher.close()


async def test_outputs_too_large_are_not_pushed_and_channels_make_room_for_the_recently_used():
    class SilentP2P:  # a next peer that takes the stream and never reads
        async def call_binary_stream_handler(self, peer_id, handler):
            await asyncio.sleep(3600)

    pusher = Pusher(SilentP2P())  # type: ignore[arg-type]
    hop = Hop("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "a" * 32, 1)
    pusher.push([hop], 0, None, torch.zeros(push.MAX_PUSH_BYTES // 4 + 1))
    assert pusher.dropped == 1 and not pusher.channels, "an output over MAX_PUSH_BYTES goes through the client"
    for n in range(push.MAX_PEERS + 1):
        pusher.push([Hop(f"QmPeer{n}", "a" * 32, 1)], 0, None, torch.zeros(1, 1, 4))
    assert len(pusher.channels) == push.MAX_PEERS and "QmPeer0" not in pusher.channels
    pusher.push([Hop("QmPeer1", "a" * 32, 2)], 0, None, torch.zeros(1, 1, 4))
    pusher.push([Hop("QmPeerNew", "a" * 32, 1)], 0, None, torch.zeros(1, 1, 4))
    assert "QmPeer1" in pusher.channels and "QmPeer2" not in pusher.channels, "the least recently used gives way"
    await pusher.close()
