"""A hostile peer cannot make the client hold more than the answer it is due: frames are capped by what the request
implies, and a frame nobody asked for ends the stream (the session then fails over and the peer is banned)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch

from swarm.client.stream import SMALL_FRAME, PeerStream
from swarm.codec import make_response
from swarm.protocol import PeerError


class Writer:
    def __init__(self):
        self.sent = []

    def write(self, data):
        self.sent.append(data)

    async def drain(self):
        pass

    def close(self):
        pass


def frame(message) -> bytes:
    payload = message.SerializeToString()
    return b"\x00" + len(payload).to_bytes(8, "big") + payload


def header(length: int) -> bytes:
    return b"\x00" + length.to_bytes(8, "big")


def stream() -> tuple[PeerStream, asyncio.StreamReader]:
    reader = asyncio.StreamReader()
    link = SimpleNamespace(peer=SimpleNamespace(peer_id="evil"), start=0, end=1)
    return PeerStream(link, reader, Writer()), reader  # type: ignore[arg-type]


async def test_an_answer_of_the_size_due_is_read():
    s, reader = stream()
    hidden = torch.randn(1, 3, 8)
    reader.feed_data(frame(make_response({"type": "result", "position": 3}, (hidden + 1,))))
    assert torch.equal(await s.step(hidden, 0, timeout=5), hidden + 1)
    await s.close()


async def test_a_frame_larger_than_the_answer_due_is_refused_before_it_is_read():
    s, reader = stream()
    hidden = torch.randn(1, 3, 8)
    reader.feed_data(header(10 * hidden.numel() * 4 + SMALL_FRAME))  # declares far more than 3x8 floats
    with pytest.raises(PeerError, match="exceeds the limit"):
        await s.step(hidden, 0, timeout=5)
    await s.close()


async def test_an_unsolicited_frame_is_capped_small_and_a_second_one_ends_the_stream():
    s, reader = stream()
    reader.feed_data(header(256 << 20))  # 256 MiB while no answer is due: refused at its header
    await asyncio.sleep(0.01)
    with pytest.raises(PeerError, match="exceeds the limit of"):
        await s.step(torch.randn(1, 1, 8), 0, timeout=5)
    await s.close()

    s, reader = stream()
    junk = frame(make_response({"type": "result", "position": 1}, (torch.zeros(1, 1, 8),)))
    for _ in range(1000):  # a flood of small frames nobody asked for
        reader.feed_data(junk)
    await asyncio.sleep(0.05)
    assert s._inbox.qsize() <= 2  # one frame and the violation: the rest was never read
    hidden = torch.randn(1, 1, 8)
    out = await s.step(hidden, 0, timeout=5)  # the first junk frame passes for the answer (it has the right shape)...
    assert out.shape == hidden.shape
    with pytest.raises(PeerError, match="nobody asked for"):  # ...then the stream is over
        await s.step(hidden, 1, timeout=5)
    await s.close()
