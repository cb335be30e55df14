"""Server-to-server push (the wire is in swarm.protocol): a step's output goes straight to the next peer of the
session's chain, so that a token costs hops + 1 one-way delays instead of 2 x hops.

- `Pusher` sends: one persistent stream per next peer (opening a stream costs a round trip; at most MAX_PEERS, the
  least recently used closed for a new one), each with a queue bounded in bytes; outputs over MAX_PUSH_BYTES (long
  prompts' chunks of large models) are not pushed. A push is never awaited by the step that makes it: a full
  queue, a peer that cannot be reached or a failed write drops pushes (that peer's channel ends; it gets none for
  RETRY_AFTER seconds), and the client's own copy of the step, which it sends anyway, goes on alone.
- `Inputs` is what one session computes next: its client's frames and the steps pushed to it, in arrival order,
  both bounded (the client's reader waits for room; a pushed step beyond MAX_PUSHED is dropped).
- The receiving side (SpanHandler.handle_push) finds the session by its link's push key, a secret only the client
  and the peers of its chain know.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.codec import END_OF_STREAM, make_request, send_message
from swarm.protocol import PUSH_HANDLER, Hop

logger = logging.getLogger(__name__)

MAX_PUSH_BYTES = 8 << 20  # a larger output is not pushed (the client's copy goes); a larger push frame is refused
QUEUE_BYTES = 16 << 20  # bytes of pushes waiting for one next peer's stream
MAX_PEERS = 64  # next peers with a stream open at once (the least recently used is closed for a new one)
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
RETRY_AFTER = 5.0  # seconds a peer that could not be reached gets no pushes
IDLE_CLOSE = 120.0  # a stream nothing was pushed to for this long is closed
MAX_PUSHED = 2  # pushed steps of one session waiting to be computed


@dataclass(frozen=True)
class PushedStep:
    step: int
    position: int
    group: tuple[str, int] | None
    hops: list[Hop]
    hidden: torch.Tensor


@dataclass(frozen=True)
class Input:
    """One thing a session takes next: a client frame (None: its end of stream), a pushed step, or the error that
    ended the client's stream."""

    request: runtime_pb2.ExpertRequest | None = None
    pushed: PushedStep | None = None
    error: BaseException | None = None


class Inputs:
    """A session's client frames and pushed steps, in arrival order."""

    def __init__(self, max_client: int = 2):
        self._queue: asyncio.Queue[Input] = asyncio.Queue()
        self._pushed = 0
        self._room = asyncio.Semaphore(max_client)

    async def from_client(self, item: Input) -> None:
        await self._room.acquire()
        self._queue.put_nowait(item)

    def from_push(self, step: PushedStep) -> bool:
        """Queue a pushed step; False (dropped) when MAX_PUSHED wait already."""
        if self._pushed >= MAX_PUSHED:
            return False
        self._pushed += 1
        self._queue.put_nowait(Input(pushed=step))
        return True

    async def get(self) -> Input:
        item = await self._queue.get()
        if item.pushed is not None:
            self._pushed -= 1
        else:
            self._room.release()
        return item


class _Channel:
    def __init__(self, pusher: Pusher, peer_id: str):
        self.pusher, self.peer_id = pusher, peer_id
        self.queue: asyncio.Queue[tuple[runtime_pb2.ExpertRequest, int]] = asyncio.Queue()
        self.queued_bytes = 0
        self.task = asyncio.create_task(self._run(), name=f"push-{peer_id[-8:]}")

    def offer(self, message: runtime_pb2.ExpertRequest, size: int) -> None:
        if self.queued_bytes + size > QUEUE_BYTES:
            self.pusher.dropped += 1
            return
        self.queued_bytes += size
        self.queue.put_nowait((message, size))

    async def _run(self) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_CLOSE):
                        message, size = await self.queue.get()
                except TimeoutError:
                    return
                self.queued_bytes -= size
                if writer is None:
                    try:
                        async with asyncio.timeout(CONNECT_TIMEOUT):
                            _, _, writer = await self.pusher.p2p.call_binary_stream_handler(
                                PeerID.from_base58(self.peer_id), PUSH_HANDLER)
                    except Exception as e:  # unreachable, refused, a malformed id: the client's copy goes on
                        logger.info("cannot push to peer %s (%r); its steps go through the client for %.0f s",
                                    self.peer_id, e, RETRY_AFTER)
                        self.pusher.unreachable(self.peer_id, 1 + self.queue.qsize())
                        return
                try:
                    async with asyncio.timeout(SEND_TIMEOUT):
                        await send_message(writer, message)
                    self.pusher.sent += 1
                except (TimeoutError, OSError, ConnectionError) as e:
                    logger.info("pushing to peer %s failed (%r)", self.peer_id, e)
                    self.pusher.unreachable(self.peer_id, 1 + self.queue.qsize())
                    return
        finally:
            if self.pusher.channels.get(self.peer_id) is self:
                del self.pusher.channels[self.peer_id]
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.write(END_OF_STREAM)
                writer.close()


class Pusher:
    """Pushes steps' outputs to the next peers of their sessions' chains, never waiting for them."""

    def __init__(self, p2p: P2P):
        self.p2p = p2p
        self.channels: dict[str, _Channel] = {}  # in order of last use (the first is the least recently used)
        self.closed = False
        self._unreachable: dict[str, float] = {}  # peer id -> until when it gets no pushes (its channel is closed)
        self.sent = 0
        self.dropped = 0

    def unreachable(self, peer_id: str, dropped: int) -> None:
        """A next peer could not be reached or written to: `dropped` pushes are lost, and it gets none for
        RETRY_AFTER seconds (its channel ends, so peers a client names that do not exist hold no slot)."""
        self.dropped += dropped
        now = time.monotonic()
        if len(self._unreachable) >= 4 * MAX_PEERS:
            self._unreachable = {peer: until for peer, until in self._unreachable.items() if until > now}
        if len(self._unreachable) < 4 * MAX_PEERS:
            self._unreachable[peer_id] = now + RETRY_AFTER

    def push(self, hops: list[Hop], position: int, group: tuple[str, int] | None, hidden: torch.Tensor) -> None:
        """Send `hidden` (a step at `position`) to hops[0], naming the hops after it (dropped when too large, or
        while that peer is unreachable)."""
        hop = hops[0]
        size = hidden.numel() * hidden.element_size()
        if self.closed or size > MAX_PUSH_BYTES or self._unreachable.get(hop.peer_id, 0.0) > time.monotonic():
            self.dropped += 1
            return
        metadata: dict = {"type": "push", "key": hop.key, "step": hop.step, "position": position,
                          "next": [h.to_wire() for h in hops[1:]]}
        if group is not None:
            metadata["group"] = list(group)
        channel = self.channels.pop(hop.peer_id, None)
        if channel is None:
            if len(self.channels) >= MAX_PEERS:  # a peer a client named once gives way to one in use
                self.channels.pop(next(iter(self.channels))).task.cancel()
            channel = _Channel(self, hop.peer_id)
        self.channels[hop.peer_id] = channel  # the most recently used last
        channel.offer(make_request(metadata, (hidden,)), size)

    async def close(self) -> None:
        self.closed = True
        channels = list(self.channels.values())
        for channel in channels:
            channel.task.cancel()
        await asyncio.gather(*(c.task for c in channels), return_exceptions=True)
