"""One session's stream to one peer: its frames, bounded by what is due, and its answers, checked.

    stream = await PeerStream.open(p2p, link, OpenRequest(...), timeout)  # or open_streams(p2p, chain, ...)
    out = await stream.step(hidden, position, timeout)      # send + result (swarm.protocol's step / result)
    await stream.close()

InferenceSession (swarm.client.session) owns a chain of them: failover, replay, push, verification.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PDaemonError, P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm.client.routing import Link
from swarm.codec import (
    END_OF_STREAM,
    MAX_FRAME_OVERHEAD,
    EndOfStream,
    decode_tensor,
    digest,
    frame_bytes,
    make_request,
    receive_message,
    send_message,
    unpack_metadata,
)
from swarm.protocol import INFERENCE_HANDLER, ErrorCode, Hop, OpenRequest, PeerError

SMALL_FRAME = MAX_FRAME_OVERHEAD  # what may arrive while no step's answer is due: 'opened', an error


Probe = tuple[float, Callable[[], Awaitable[bool]]]  # (seconds of silence, then: is the peer alive?)


class PushMismatch(PeerError):
    """A link's answer is not for the input and position sent to it (swarm.protocol: push). A step caught it
    without blaming anyone (InferenceSession._rebuild); elsewhere (a replay to a new stream, whose key nobody else
    knows yet) it is the peer's failure."""


class ProtocolViolation(ValueError):
    """The peer broke the stream's protocol (a frame nobody asked for)."""


class PeerStream:
    """The stream of one session to one peer, for blocks [link.start, link.end)."""

    def __init__(self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, push_key: str = ""):
        self.link = link
        self._writer = writer
        self.closed = False
        self.push_key = push_key  # the link's secret for server-to-server push ("": not opened for push)
        self.steps = 0  # numbered steps sent or pushed to it (swarm.protocol)
        self.handle: int | None = None  # the peer's name for the session in group frames (None: it takes none)
        self.forked = 0  # tokens the peer copied into the session from another when it opened (swarm.protocol: fork)
        self.session_id = ""  # what the session was opened as (a fork names its source by handle and this)
        self.parks = False  # the peer takes park frames (swarm.protocol: park; an older peer does not)
        # Frames are read as they arrive: a peer that ends the stream after an error (idle timeout, refusal) makes
        # our next write fail, and a failed write discards whatever the socket had buffered, the reason included.
        # What a peer can make this client hold is bounded: a frame may be as large as the answer due (SMALL_FRAME
        # when none is), and at most one frame waits unread; another one is a protocol violation that ends the
        # stream (the session fails over, the router bans the peer).
        self._limit = SMALL_FRAME
        self._due = False  # an answer is due (expect() was called and it has not been received)
        self._inbox: asyncio.Queue[runtime_pb2.ExpertResponse | Exception] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read_frames(reader))

    async def _read_frames(self, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await receive_message(reader, runtime_pb2.ExpertResponse, lambda: self._limit)
            except (EndOfStream, ValueError, OSError, ConnectionError) as e:
                self._inbox.put_nowait(e)
                return
            if not self._inbox.empty():
                self._inbox.put_nowait(ProtocolViolation("sent a frame nobody asked for"))
                return
            self._inbox.put_nowait(message)

    @classmethod
    async def open(cls, p2p: P2P, link: Link, request: OpenRequest, timeout: float) -> PeerStream:
        peer_id = PeerID.from_base58(link.peer.peer_id)
        try:
            async with asyncio.timeout(timeout):
                _, reader, writer = await p2p.call_binary_stream_handler(peer_id, INFERENCE_HANDLER)
        except (TimeoutError, P2PDaemonError, P2PHandlerError, OSError, ConnectionError) as e:
            raise PeerError(f"cannot reach peer {link.peer.peer_id}: {e!r}", peer_id=link.peer.peer_id) from e
        stream = cls(link, reader, writer, request.push_key)
        stream.session_id = request.session_id
        await stream._send(make_request(request.to_dict()))
        opened = unpack_metadata((await stream._receive(timeout, expected="opened")).metadata)
        handle = opened.get("handle")
        if isinstance(handle, int) and not isinstance(handle, bool) and 0 <= handle < 2**63:
            stream.handle = handle
        stream.parks = opened.get("parks") is True
        forked = opened.get("forked")
        if request.fork is not None and forked == request.fork[1] and not isinstance(forked, bool):
            stream.forked = forked
        return stream

    async def step(self, hidden: torch.Tensor, position: int, timeout: float,
                   group: tuple[str, int] | None = None, probe: Probe | None = None) -> torch.Tensor:
        try:
            await self.send(hidden, position, group)
        except asyncio.CancelledError:
            await self.close()
            raise
        return (await self.result(hidden, timeout, probe, position))[0]

    def expect(self, like: torch.Tensor) -> None:
        """A result of `like`'s size may arrive (pushed before its input was sent from here)."""
        self._limit = frame_bytes(like.numel(), like.dtype)
        self._due = True

    def number(self) -> Hop:
        """Number the next step of this stream (server-to-server push): the hop that names it."""
        self.steps += 1
        return Hop(self.link.peer.peer_id, self.push_key, self.steps)

    async def send(self, hidden: torch.Tensor, position: int, group: tuple[str, int] | None = None,
                   number: int | None = None, hops: list[Hop] | None = None) -> None:
        """Send a step (`number` and the `hops` after this link: see swarm.protocol); its result() is due."""
        metadata: dict = {"type": "step", "position": position}
        if group is not None:
            metadata["group"] = list(group)
        if number is not None:
            metadata["step"] = number
            metadata["next"] = [hop.to_wire() for hop in hops or []]
        self.expect(hidden)
        await self._send(make_request(metadata, (hidden,)))

    async def park(self) -> None:
        """Tell the peer that the session is kept only for reuse: it may free it when it needs room (swarm.protocol:
        park); nothing is answered. The next step un-parks it. Nothing is sent to a peer that takes no park frames
        (it keeps the session as any other)."""
        if self.parks:
            await self._send(make_request({"type": "park"}))

    async def unpark(self, timeout: float) -> None:
        """Take a parked session back: once this returns the peer will not free it (PeerError where it has)."""
        if self.parks:
            await self._send(make_request({"type": "unpark"}))
            await self._receive(timeout, expected="unparked")

    @property
    def ended(self) -> bool:
        """Closed, or the peer said something while no answer was due (it ended the session: an error, the end of
        its stream)."""
        return self.closed or (not self._due and not self._inbox.empty())

    async def result(self, hidden: torch.Tensor, timeout: float, probe: Probe | None = None,
                     position: int | None = None) -> tuple[torch.Tensor, dict]:
        """The answer to the step of input `hidden` at `position`: its output (checked: shape, dtype, finite) and
        metadata. On a stream opened for push, first whether the peer computed from that input at that position
        (PushMismatch if not: a push that differed, or an answer to one nobody asked for; nobody's fault that can
        be told). `probe`: see _next_frame."""
        try:
            response = await self._receive(timeout, expected="result", probe=probe)
        except asyncio.CancelledError:
            await self.close()  # this step's answer would be read as the next step's: the stream cannot go on
            raise
        metadata = unpack_metadata(response.metadata)
        if self.push_key and position is not None and (metadata.get("input_digest") != digest(hidden)
                                                       or metadata.get("position") != position + hidden.shape[1]):
            raise PushMismatch(f"peer {self.link.peer.peer_id} answered a step other than the one sent to it",
                               ErrorCode.INTERNAL, self.link.peer.peer_id)
        return self._output(response, hidden), metadata

    async def group_step(self, hidden: torch.Tensor, handles: list[int], positions: list[int],
                         group: tuple[str, int], timeout: float, probe: Probe | None = None
                         ) -> tuple[torch.Tensor, list[bool]]:
        """A group frame on this stream (swarm.protocol): row j of hidden [k, 1, H] is the next token of the
        session the peer named handles[j], at positions[j] → (outputs [k, 1, H], whether each row was taken; a
        refused row is stepped alone by its session). Checked: every row answered, an output of the input's shape
        and dtype, finite in every row taken; else PeerError."""
        self.expect(hidden)
        try:
            await self._send(make_request({"type": "group_step", "handles": handles, "positions": positions,
                                           "group": list(group)}, (hidden,)))
            response = await self._receive(timeout, expected="result", probe=probe)
        except asyncio.CancelledError:
            await self.close()  # the answer would be read as the next step's
            raise
        rows = unpack_metadata(response.metadata).get("rows")
        if not isinstance(rows, list) or len(rows) != len(handles):
            raise self._error(f"answered a group step of {len(handles)} rows without a status for each")
        taken = []
        for row, position in zip(rows, positions, strict=True):
            refused = isinstance(row, str)  # its error code
            if not refused and (not isinstance(row, int) or isinstance(row, bool) or row != position + 1):
                raise self._error(f"answered a group row with {row!r}")
            taken.append(not refused)
        return self._output(response, hidden, torch.tensor(taken)), taken

    def _output(self, response: runtime_pb2.ExpertResponse, hidden: torch.Tensor,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """An answer's one tensor, checked against the input `hidden`: its shape and dtype, finite (in `rows`, a
        mask over its first dimension, when given)."""
        if len(response.tensors) != 1:
            raise self._error(f"answered with {len(response.tensors)} tensors instead of 1")
        try:
            out = decode_tensor(response.tensors[0], max_elements=hidden.numel())
        except ValueError as e:
            raise self._error(f"answered with a malformed tensor: {e}") from e
        if out.shape != hidden.shape or out.dtype != hidden.dtype:
            raise self._error(f"answered {tuple(out.shape)} {out.dtype} to {tuple(hidden.shape)} {hidden.dtype}")
        if not torch.isfinite(out if rows is None else out[rows]).all():
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

    async def _receive(self, timeout: float, expected: str, probe: Probe | None = None) -> runtime_pb2.ExpertResponse:
        try:
            response = await self._next_frame(timeout, probe)
            self._limit, self._due = SMALL_FRAME, False
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

    async def _next_frame(self, timeout: float, probe: Probe | None) -> runtime_pb2.ExpertResponse | Exception:
        """The next frame within `timeout` seconds. With a probe (after, alive): a peer silent for `after` seconds
        is asked whether it lives while the answer is still awaited, and one that says nothing to either fails
        now (a host cut off is replaced in seconds; a slow step that still comes is taken)."""
        if probe is None or probe[0] >= timeout:
            async with asyncio.timeout(timeout):  # unlike wait_for, no extra task per message
                return await self._inbox.get()
        after, alive = probe
        began = time.monotonic()
        try:
            async with asyncio.timeout(after):
                return await self._inbox.get()  # a get cut short loses nothing
        except TimeoutError:
            pass
        getter, check = asyncio.ensure_future(self._inbox.get()), asyncio.ensure_future(alive())
        try:
            remaining = max(0.0, timeout - (time.monotonic() - began))
            done, _ = await asyncio.wait({getter, check}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                return getter.result()
            if check in done and not check.result():
                raise self._error(f"did not answer within {after:.1f} s, nor a liveness probe")
            async with asyncio.timeout(max(0.0, timeout - (time.monotonic() - began))):
                return await getter
        finally:
            check.cancel()
            getter.cancel()

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
        # an answer awaited meanwhile (a group frame's, awaited by the round, not by this session's caller) fails now
        self._inbox.put_nowait(EndOfStream())


async def open_streams(p2p: P2P, chain: list[Link], max_length: int, batch_size: int,
                       timeout: float, push: bool = False,
                       forks: list[tuple[int, int, str]] | None = None) -> list[PeerStream]:
    """Open one stream per link, concurrently; on any failure close the others and raise the first error.
    `push`: each link whose peer takes pushes gets a secret push key (swarm.protocol); `forks`: per link, (handle,
    tokens, session id) of a session of this client on that peer to start from (swarm.protocol: fork)."""
    session_id = uuid.uuid4().hex
    opened = await asyncio.gather(
        *(PeerStream.open(p2p, link, OpenRequest(session_id, max_length, batch_size, link.start, link.end,
                                                 push_key=secrets.token_hex(16) if push and link.peer.push else "",
                                                 fork=forks[i] if forks else None),
                          timeout)
          for i, link in enumerate(chain)),
        return_exceptions=True,
    )
    streams = [s for s in opened if isinstance(s, PeerStream)]
    failures = [e for e in opened if isinstance(e, BaseException)]
    if failures:
        for stream in streams:
            await stream.close()
        raise failures[0]
    return streams
