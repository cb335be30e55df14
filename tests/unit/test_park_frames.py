"""Park frames (swarm.protocol: park) go only to a peer that said it takes them: an older peer would take one for a
malformed step and end the session."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace

from hivemind.proto import runtime_pb2

from swarm.client.stream import PeerStream
from swarm.codec import make_response, receive_message, send_message, unpack_metadata


async def test_park_frames_go_only_to_a_peer_that_takes_them():
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    peer_reader, peer_writer = await asyncio.open_connection(sock=theirs)
    stream = PeerStream(SimpleNamespace(peer=SimpleNamespace(peer_id="p")), reader, writer)  # type: ignore[arg-type]
    try:
        assert not stream.parks  # until an `opened` says so
        await stream.park()
        await stream.unpark(timeout=1.0)  # nothing sent, nothing awaited
        stream.parks = True
        await stream.park()
        frame = await asyncio.wait_for(receive_message(peer_reader, runtime_pb2.ExpertRequest, 1 << 16), 5)
        assert unpack_metadata(frame.metadata) == {"type": "park"} and not frame.tensors  # the first frame sent

        async def answer():
            frame = await receive_message(peer_reader, runtime_pb2.ExpertRequest, 1 << 16)
            assert unpack_metadata(frame.metadata) == {"type": "unpark"}
            await send_message(peer_writer, make_response({"type": "unparked"}))

        answering = asyncio.ensure_future(answer())
        await stream.unpark(timeout=5.0)
        await answering
        assert not stream.ended  # the answer was taken, nothing else is waiting
    finally:
        await stream.close()
        peer_writer.close()
