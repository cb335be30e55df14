"""Inference sessions: one persistent stream per peer of a chain, hidden states passed along it step by step.

    session = await InferenceSession.open(p2p, chain, max_length=512)
    hidden = await session.step(embeddings)         # [B, T, H] at the next position → [B, T, H] after all blocks
    await session.close()                            # the peers free the session's KV cache
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm.client.routing import Link
from swarm.codec import (
    END_OF_STREAM,
    EndOfStream,
    decode_tensor,
    make_request,
    receive_message,
    send_message,
    unpack_metadata,
)
from swarm.protocol import INFERENCE_HANDLER, ErrorCode, OpenRequest, PeerError

logger = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 256 << 20  # a frame's size is checked against this before it is read; shapes are checked after


class PeerStream:
    """The stream of one session to one peer, for blocks [link.start, link.end)."""

    def __init__(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.link = link
        self._writer = writer
        self.closed = False
        # Frames are read as they arrive: a peer that ends the stream after an error (idle timeout, refusal) makes
        # our next write fail, and a failed write discards whatever the socket had buffered, the reason included.
        self._inbox: asyncio.Queue[runtime_pb2.ExpertResponse | Exception] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read_frames(reader))

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                self._inbox.put_nowait(await receive_message(reader, runtime_pb2.ExpertResponse,
                                                             MAX_RESPONSE_BYTES))
            except (EndOfStream, ValueError, OSError, ConnectionError) as e:
                self._inbox.put_nowait(e)
                return

    @classmethod
    async def open(cls, p2p: P2P, link: Link, request: OpenRequest, timeout: float) -> PeerStream:
        peer_id = PeerID.from_base58(link.peer.peer_id)
        try:
            async with asyncio.timeout(timeout):
                _, reader, writer = await p2p.call_binary_stream_handler(peer_id, INFERENCE_HANDLER)
        except (TimeoutError, P2PDaemonError, P2PHandlerError, OSError, ConnectionError) as e:
            raise PeerError(f"cannot reach peer {link.peer.peer_id}: {e!r}", peer_id=link.peer.peer_id) from e
        stream = cls(link, reader, writer)
        await stream._send(make_request(request.to_dict()))
        await stream._receive(timeout, expected="opened")
        return stream

    async def step(self, hidden: torch.Tensor, position: int, timeout: float,
                   group: tuple[str, int] | None = None) -> torch.Tensor:
        metadata: dict = {"type": "step", "position": position}
        if group is not None:
            metadata["group"] = list(group)
        await self._send(make_request(metadata, (hidden,)))
        response = await self._receive(timeout, expected="result")
        if len(response.tensors) != 1:
            raise self._error(f"answered with {len(response.tensors)} tensors instead of 1")
        try:
            out = decode_tensor(response.tensors[0], max_elements=hidden.numel())
        except ValueError as e:
            raise self._error(f"answered with a malformed tensor: {e}") from e
        if out.shape != hidden.shape or out.dtype != hidden.dtype:
            raise self._error(f"answered {tuple(out.shape)} {out.dtype} to {tuple(hidden.shape)} {hidden.dtype}")
        if not torch.isfinite(out).all():
            raise self._error("answered with NaN or infinite hidden states")
        return out

    async def _send(self, message: runtime_pb2.ExpertRequest) -> None:
        if self.closed:
            raise self._error("stream is closed")
        try:
            await send_message(self._writer, message)
        except (OSError, ConnectionError) as e:
            # The peer may have closed the stream after telling us why (idle timeout, refusal): surface that.
            try:
                await self._receive(1.0, expected="result")
            except PeerError as reason:
                raise reason from e
            raise self._error(f"connection failed: {e!r}") from e

    async def _receive(self, timeout: float, expected: str) -> runtime_pb2.ExpertResponse:
        try:
            async with asyncio.timeout(timeout):  # unlike wait_for, no extra task per message
                response = await self._inbox.get()
            if isinstance(response, Exception):
                self._inbox.put_nowait(response)  # every later receive fails the same way
                raise response
        except EndOfStream:
            raise self._error("closed the stream") from None
        except TimeoutError:
            raise self._error(f"did not answer within {timeout:.1f} s") from None
        except (ValueError, OSError, ConnectionError) as e:
            raise self._error(f"failed: {e}") from e
        try:
            metadata = unpack_metadata(response.metadata)
        except ValueError as e:
            raise self._error(f"sent malformed metadata: {e}") from e
        if metadata.get("type") == "error":
            self.closed = True
            raise PeerError(f"peer {self.link.peer.peer_id}: {metadata.get('message')}",
                            str(metadata.get("code", ErrorCode.INTERNAL)), self.link.peer.peer_id)
        if metadata.get("type") != expected:
            raise self._error(f"answered {metadata.get('type')!r} where {expected!r} was due")
        return response

    def _error(self, what: str) -> PeerError:
        return PeerError(f"peer {self.link.peer.peer_id} {what}", ErrorCode.INTERNAL, self.link.peer.peer_id)

    async def close(self) -> None:
        """End the stream: the peer frees the session as soon as it reads the end of stream."""
        # No awaits: this runs in `finally` blocks of cancelled tasks (a client that hung up), where an await could
        # be interrupted before the peer hears that the session is over. close() flushes what was written.
        if not self.closed:
            self.closed = True
            with contextlib.suppress(Exception):
                self._writer.write(END_OF_STREAM)
        self._writer.close()
        self._pump.cancel()


# reroute(start, end, avoid, faulty): a chain over [start, end) without the peers in `avoid`; those in `faulty` failed
# (the others were full) and deserve a client-wide ban.
Reroute = Callable[[int, int, set[str], set[str]], Awaitable[list[Link]]]


class SessionTracker(Protocol):
    """Told which peers a session holds a stream to (routing counts the client's own sessions per peer) and how
    long their decode steps take (routing checks what peers announce against it)."""

    def opened(self, peer_ids: Iterable[str]) -> None: ...

    def closed(self, peer_ids: Iterable[str]) -> None: ...

    def observed(self, peer_id: str, blocks: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class FailoverPolicy:
    """How a session survives peers that fail mid-stream."""

    max_failovers: int = 8  # replacements per session before giving up
    min_step_timeout: float = 5.0  # a decode step never times out sooner than this...
    latency_factor: float = 10.0  # ...nor sooner than this many times the link's usual decode step
    replay_chunk: int = 1024  # tokens per replay step


class InferenceSession:
    """A session over a whole chain: `step` runs new tokens' hidden states through every block.

    It keeps, for every link, the inputs it sent for the positions cached so far. When a peer fails (connection
    lost, error, timeout, a malformed or non-finite answer) and a `reroute` is given, the peer is banned for this
    session, a replacement chain for just that link's blocks is opened, the kept inputs are replayed to rebuild its
    KV cache, and the step goes on: the caller sees no error, and greedy output is unchanged.
    """

    def __init__(self, p2p: P2P, streams: list[PeerStream], max_length: int, batch_size: int, step_timeout: float,
                 reroute: Reroute | None = None, policy: FailoverPolicy | None = None,
                 tracker: SessionTracker | None = None):
        self.p2p = p2p
        self.streams = streams
        self.tracker = tracker
        if tracker is not None:
            tracker.opened(self._peer_ids(streams))
        self.max_length = max_length
        self.batch_size = batch_size
        self.step_timeout = step_timeout
        self.reroute = reroute
        self.policy = policy or FailoverPolicy()
        self.position = 0  # tokens every peer has cached
        self.banned: set[str] = set()  # peers this session no longer uses
        self.faulty: set[str] = set()  # ...of which these failed (the others were full)
        self.failovers = 0
        self.closed = False
        self._inputs: list[torch.Tensor | None] = [None] * len(streams)  # per link: [B, >= position, H]
        self._latency: list[float | None] = [None] * len(streams)  # per link: smoothed decode step seconds

    @classmethod
    async def open(cls, p2p: P2P, chain: list[Link], max_length: int, batch_size: int = 1, timeout: float = 30.0,
                   reroute: Reroute | None = None, policy: FailoverPolicy | None = None,
                   tracker: SessionTracker | None = None) -> InferenceSession:
        streams = await open_streams(p2p, chain, max_length, batch_size, timeout)
        return cls(p2p, streams, max_length, batch_size, timeout, reroute, policy, tracker)

    @staticmethod
    def _peer_ids(streams: list[PeerStream]) -> list[str]:
        return [stream.link.peer.peer_id for stream in streams]

    async def step(self, hidden: torch.Tensor, position: int | None = None,
                   group: tuple[str, int] | None = None) -> torch.Tensor:
        """hidden: [B, T, H] of tokens at `position` (default: right after the cached ones) → last block's output.
        `group`: (id, size) of the group of decode steps of other sessions sent with this one (swarm.protocol)."""
        position = self.position if position is None else position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside 0..{self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{position + hidden.shape[1]} tokens exceed the session's max_length {self.max_length}")
        i = 0
        while i < len(self.streams):
            started = time.monotonic()
            try:
                out = await self.streams[i].step(hidden, position, self._timeout(i, hidden.shape[1]), group)
            except PeerError as e:
                await self._fail_over(i, position, e)
                continue  # the same step, now through the replacement
            self._remember(i, hidden, position, time.monotonic() - started)
            hidden, i = out, i + 1
        self.position = position + hidden.shape[1]
        return hidden

    def _timeout(self, i: int, new_tokens: int) -> float:
        latency = self._latency[i]
        if new_tokens > 1 or latency is None:
            return self.step_timeout
        return max(self.policy.min_step_timeout, self.policy.latency_factor * latency)

    def _remember(self, i: int, hidden: torch.Tensor, position: int, seconds: float) -> None:
        kept = self._inputs[i]  # its first `position` tokens are the inputs kept so far; it has room for more
        end = position + hidden.shape[1]
        if kept is None or kept.shape[1] < end or kept.shape[0] != hidden.shape[0] or kept.dtype != hidden.dtype:
            # grown by doubling: a token's step copies O(1) amortized, not the whole history (O(n^2) per session)
            capacity = min(self.max_length, max(end, 64, 2 * (kept.shape[1] if kept is not None else 0)))
            grown = hidden.new_empty(hidden.shape[0], capacity, hidden.shape[2])
            if kept is not None and position:
                grown[:, :position] = kept[:, :position]
            kept = self._inputs[i] = grown
        kept[:, position:end] = hidden
        if hidden.shape[1] == 1:
            old = self._latency[i]
            self._latency[i] = seconds if old is None else 0.8 * old + 0.2 * seconds
            if self.tracker is not None and hidden.shape[0] == 1:
                link = self.streams[i].link
                self.tracker.observed(link.peer.peer_id, link.end - link.start, seconds)

    async def _fail_over(self, i: int, position: int, error: PeerError) -> None:
        """Replace link i (which just failed) by a fresh chain over its blocks, rebuilt by replay."""
        failed = self.streams[i]
        await failed.close()
        self._avoid(failed.link.peer.peer_id, error)
        kept = self._inputs[i]
        while True:
            if self.reroute is None or self.failovers >= self.policy.max_failovers:
                raise error
            self.failovers += 1
            logger.warning("peer %s failed (%s); replacing blocks %d:%d", error.peer_id, error, failed.link.start,
                           failed.link.end)
            chain = await self.reroute(failed.link.start, failed.link.end, set(self.banned),
                                       set(self.faulty))  # NoChainError: none
            streams: list[PeerStream] = []
            try:
                streams = await open_streams(self.p2p, chain, self.max_length, self.batch_size, self.step_timeout)
                inputs: list[torch.Tensor | None] = []
                history = kept[:, :position] if position and kept is not None else None
                for stream in streams:  # replay: each new link's inputs are the previous new link's outputs
                    inputs.append(history)
                    if history is not None:
                        history = await self._replay(stream, history)
            except PeerError as e:
                for stream in streams:
                    await stream.close()
                self._avoid(e.peer_id or "", e)
                error = e
                continue
            if self.tracker is not None:
                self.tracker.closed(self._peer_ids([failed]))
                self.tracker.opened(self._peer_ids(streams))
            self.streams[i : i + 1] = streams
            self._inputs[i : i + 1] = inputs
            self._latency[i : i + 1] = [None] * len(streams)
            return

    def _avoid(self, peer_id: str, error: PeerError) -> None:
        if error.code == ErrorCode.MOVED:
            return  # it left these blocks (the fresh view it is rerouted with says so) but may serve the next ones
        self.banned.add(peer_id)
        if error.code != ErrorCode.CAPACITY:
            self.faulty.add(peer_id)

    async def _replay(self, stream: PeerStream, history: torch.Tensor) -> torch.Tensor:
        outputs = []
        for start in range(0, history.shape[1], self.policy.replay_chunk):
            chunk = history[:, start : start + self.policy.replay_chunk]
            outputs.append(await stream.step(chunk, start, self.step_timeout))
        return torch.cat(outputs, dim=1)

    async def close(self) -> None:
        self.closed = True
        for stream in self.streams:  # each close runs to completion without yielding, even in a cancelled task
            await stream.close()
        if self.tracker is not None:
            self.tracker.closed(self._peer_ids(self.streams))
            self.tracker = None

    async def __aenter__(self) -> InferenceSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def open_streams(p2p: P2P, chain: list[Link], max_length: int, batch_size: int,
                       timeout: float) -> list[PeerStream]:
    """Open one stream per link, concurrently; on any failure close the others and raise the first error."""
    session_id = uuid.uuid4().hex
    opened = await asyncio.gather(
        *(PeerStream.open(p2p, link, OpenRequest(session_id, max_length, batch_size, link.start, link.end), timeout)
          for link in chain),
        return_exceptions=True,
    )
    streams = [s for s in opened if isinstance(s, PeerStream)]
    failures = [e for e in opened if isinstance(e, BaseException)]
    if failures:
        for stream in streams:
            await stream.close()
        raise failures[0]
    return streams
