"""What a peer's inference handler bounds before and between a stream's messages: its deadlines, and the streams
that are not sessions yet (swarm.server.handler)."""

from __future__ import annotations

import collections
from dataclasses import dataclass

from swarm.protocol import ErrorCode, PeerError


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on a stream before and between its messages (PeerSettings has the flags)."""

    idle_timeout: float = 300.0  # seconds a session may stay silent between frames
    open_timeout: float = 10.0  # seconds a new stream has to send its open message
    frame_timeout: float = 60.0  # seconds the rest of a frame may take after its first byte; an answer to be taken
    max_pending_streams: int = 256  # streams not sessions yet, all clients together
    max_client_pending: int = 64  # streams not sessions yet, of one client


class PendingStreams:
    """Streams accepted whose session is not open yet (its open message is coming, or waits for capacity)."""

    def __init__(self, max_total: int, max_per_client: int):
        self.max_total, self.max_per_client = max_total, max_per_client
        self.by_client: collections.Counter[str] = collections.Counter()
        self.total = 0

    def enter(self, client: str) -> None:
        if self.total >= self.max_total:
            raise PeerError(f"this peer has its maximum of {self.max_total} streams opening; retry later",
                            ErrorCode.CAPACITY)
        if self.by_client[client] >= self.max_per_client:
            raise PeerError(f"this client has its maximum of {self.max_per_client} streams opening on this peer",
                            ErrorCode.CAPACITY)
        self.by_client[client] += 1
        self.total += 1

    def leave(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if not self.by_client[client]:
            del self.by_client[client]
