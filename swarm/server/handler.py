"""The peer's RPC handlers over hivemind P2P: the inference stream and the info call.

A request the peer cannot honour gets an `error` message with a code and a human-readable reason, then the stream
ends and the session's memory is freed; other sessions never notice. Only unexpected failures are logged with a
traceback.

Everything a client sends is bounded before it is read (StreamLimits):
- a stream is pending until its open message is admitted as a session: one client may have `max_client_pending`
  such streams, all clients together `max_pending_streams` (more are refused with `capacity` at once), and the open
  message (metadata only: a frame of OPEN_FRAME_BYTES at most, refused at its header past that) must arrive within
  `open_timeout`;
- a step's frame is at most what the session may send in one step (batch x max_chunk_tokens x hidden float32s);
- between frames a session may stay silent for `idle_timeout`; once a frame's first byte has arrived the rest must
  arrive within `frame_timeout`, and the client must take each answer within `frame_timeout`; else the stream is
  closed (with `idle_timeout` where the client can still read it) and the session freed.
What a client may hold once it has sessions (slots, KV, queued compute) is its fair share (swarm.server.fairness).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable

import torch
from hivemind.p2p import P2P, P2PContext
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from swarm import local_socket
from swarm.codec import (
    MAX_FRAME_OVERHEAD,
    MAX_METADATA_BYTES,
    EndOfStream,
    decode_tensor,
    digest,
    make_response,
    pack_metadata,
    receive_message,
    send_message,
    unpack_metadata,
)
from swarm.protocol import (
    INFERENCE_HANDLER,
    INFO_HANDLER,
    MAX_GROUP_ROWS,
    PROTOCOL_VERSION,
    PUSH_HANDLER,
    PUSH_KEY,
    ErrorCode,
    OpenRequest,
    PeerError,
    SpanInfo,
    parse_group,
    parse_hops,
    parse_step_number,
)
from swarm.server.backend import Session, SpanBackend, bad_request
from swarm.server.push import MAX_PUSH_BYTES, Input, Inputs, PushedStep, Pusher
from swarm.server.stream_limits import PendingStreams, StreamLimits

logger = logging.getLogger(__name__)

LINGER_SECONDS = 10.0
OPEN_FRAME_BYTES = MAX_METADATA_BYTES + 1024  # an open message is metadata only; the rest is protobuf framing
MAX_PUSH_STREAMS = 32  # incoming push streams (from the peers before this one in chains), all peers together...
MAX_PEER_PUSH_STREAMS = 4  # ...and of one peer (a pusher keeps one; it opens another after a failed write)
MAX_UNKNOWN_PUSHES = 64  # a push stream whose last this many frames named no session here is closed


class SpanHandler:
    def __init__(self, backend: SpanBackend, info: Callable[[], SpanInfo], limits: StreamLimits,
                 allowed_clients: set[str] | None = None):
        self.backend: SpanBackend | None = backend  # None while the peer loads other blocks
        self.hidden_size = backend.span.hidden_size
        self.info = info
        self.limits = limits
        self.pending = PendingStreams(limits.max_pending_streams, limits.max_client_pending)
        self.allowed_clients = allowed_clients or set()  # empty: anyone
        self.pusher: Pusher | None = None  # set by register
        self.pushed: dict[str, tuple[Session, Inputs]] = {}  # push key -> the session it pushes to
        self.push_streams: collections.Counter[str] = collections.Counter()  # open push streams per sender

    async def register(self, p2p: P2P) -> None:
        # The inference stream reads and writes frames directly (hivemind's framing): no per-message tasks or
        # queues between the socket and the session, and a frame's declared size is checked before it is read.
        await p2p.add_binary_stream_handler(INFERENCE_HANDLER, self.handle_stream)
        await p2p.add_binary_stream_handler(PUSH_HANDLER, self.handle_push)
        await p2p.add_protobuf_handler(INFO_HANDLER, self.rpc_info, runtime_pb2.ExpertUID)
        self.pusher = Pusher(p2p)

    async def handle_stream(self, info: StreamInfo, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        await self.serve_stream(info.peer_id.to_base58(), reader, writer)

    async def handle_local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An inference stream from this host's Unix socket (swarm.local_socket), served as the client "local"."""
        await self.serve_stream(local_socket.CLIENT, reader, writer)

    async def serve_stream(self, client: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One inference stream of `client` to its end."""
        try:
            async with contextlib.aclosing(self.inference(reader, client)) as responses:
                async for response in responses:
                    async with asyncio.timeout(self.limits.frame_timeout):  # a client that stops reading
                        await send_message(writer, response)
            # Wait for the client to read what is in flight (an error's reason) and hang up first. Neither a close
            # nor a half-close of ours may come first: on either, p2pd closes its stream for reading, then resets it
            # (doStreamPipe), and a reset makes the client's side discard a frame it has received and not read yet.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINGER_SECONDS):
                    while await reader.read(1 << 16):  # discard, never buffer, whatever still arrives
                        pass
        except TimeoutError:
            logger.info("client %s took no answer for %.0f s: stream closed", client, self.limits.frame_timeout)
        except (ConnectionError, OSError):
            logger.debug("client %s went away", client)
        finally:
            writer.close()

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=pack_metadata(self.info().to_dict()))

    async def inference(self, reader: asyncio.StreamReader,
                        client: str) -> AsyncGenerator[runtime_pb2.ExpertResponse, None]:
        session, backend, pending = None, None, False
        try:
            if self.allowed_clients and client not in self.allowed_clients and client != local_socket.CLIENT:
                raise PeerError(f"client {client} is not allowed on this peer", ErrorCode.FORBIDDEN)
            self.pending.enter(client)
            pending = True
            first = await self._receive(reader, self.limits.open_timeout, OPEN_FRAME_BYTES)
            if first is None:
                return
            backend = self.backend  # a peer that moves gets a new backend; this session stays on its own
            if backend is None:
                raise PeerError("this peer is loading other blocks; route elsewhere", ErrorCode.MOVED)
            opening = self._parse_open(first)
            session = await backend.admit(opening, client)
            if opening.fork is not None:
                await backend.fork(session, *opening.fork)
            self.pending.leave(client)
            pending = False
            opened = {"type": "opened", "session_id": session.session_id, "max_length": session.max_length,
                      "blocks": [backend.span.start + session.blocks.start, backend.span.start + session.blocks.stop],
                      "handle": session.handle, "parks": True}
            if opening.fork is not None:
                opened["forked"] = opening.fork[1]
            yield make_response(opened)
            frame_bytes = session.batch_size * backend.limits.max_chunk_tokens * self.hidden_size * 4
            if session.push_key:
                async for response in self._pushed_session(reader, backend, session,
                                                           frame_bytes + MAX_FRAME_OVERHEAD):
                    yield response
                return
            while (request := await self._next(reader, session, frame_bytes + MAX_FRAME_OVERHEAD)) is not None:
                metadata = self._metadata(request)
                if self._parks(session, request, metadata):
                    if not session.parked:
                        yield make_response({"type": "unparked"})
                    continue
                if metadata.get("type") == "group_step":
                    yield await self._group_step(backend, session, request, metadata)
                else:
                    yield await self._step(backend, session, request, metadata)
        except PeerError as e:
            logger.info("refused a request from %s: %s", client, e)
            yield make_response({"type": "error", "code": str(e.code), "message": str(e)})
        except Exception as e:
            logger.exception("session from %s failed", client)
            # the traceback stays in this peer's log: a client (anyone) learns only that the step failed
            yield make_response({"type": "error", "code": ErrorCode.INTERNAL.value,
                                 "message": f"the peer failed this request ({type(e).__name__})"})
        finally:
            if pending:
                self.pending.leave(client)
            if session is not None and backend is not None:
                backend.close(session)

    async def _pushed_session(self, reader: asyncio.StreamReader, backend: SpanBackend, session: Session,
                              max_bytes: int) -> AsyncGenerator[runtime_pb2.ExpertResponse, None]:
        """A session opened with a push key: its steps come from its client's frames and from the previous peer
        of its chain (handle_push), whichever brings a numbered step first; it is computed once, pushed on to the
        next peer when the step names one, and answered to the client. A pushed step is taken only as the step
        after the client's last numbered one (so a lying pusher can make at most one answer the client did not
        ask for, which the client's digest check catches), and none once the client has sent an unnumbered step
        after numbered ones (it has stopped pushing)."""
        if session.push_key in self.pushed:
            raise bad_request("this push_key is in use; draw another")
        inputs = Inputs()
        self.pushed[session.push_key] = (session, inputs)
        reading = asyncio.create_task(self._read_client(reader, session, max_bytes, inputs))
        done = seen = 0  # numbered steps computed; the client's last numbered frame
        pushes = True
        try:
            while True:
                item = await inputs.get()
                if item.error is not None:
                    raise item.error
                if item.pushed is not None:
                    pushed = item.pushed
                    if not pushes or pushed.step != done + 1 or pushed.step != seen + 1:
                        continue  # the client's copy came first, or not the step due
                    try:
                        out = await backend.step(session, pushed.hidden, pushed.position, pushed.group)
                    except PeerError as e:
                        if e.code != ErrorCode.BAD_REQUEST:
                            raise
                        logger.info("dropped a step pushed to session %s: %s", session.key, e)
                        continue  # the client's copy comes anyway
                    done, hidden, position, hops = pushed.step, pushed.hidden, pushed.position, pushed.hops
                    group, was_pushed = pushed.group, True
                else:
                    if item.request is None:
                        return
                    metadata = self._metadata(item.request)
                    if self._parks(session, item.request, metadata):
                        if not session.parked:
                            yield make_response({"type": "unparked"})
                        continue
                    if metadata.get("type") == "group_step":  # unnumbered: no more pushes after numbered steps
                        pushes = pushes and not seen
                        yield await self._group_step(backend, session, item.request, metadata)
                        continue
                    hidden, position, group = self._parse_step(backend, session, item.request, metadata)
                    try:
                        number, hops = parse_step_number(metadata.get("step")), parse_hops(metadata.get("next", []))
                    except ValueError as e:
                        raise bad_request(str(e)) from e
                    if number is None:
                        pushes = pushes and not seen
                    else:
                        seen = max(seen, number)
                        if number <= done:
                            continue  # pushed and computed already
                    out = await backend.step(session, hidden, position, group)
                    done, was_pushed = max(done, number or 0), False
                if hops and self.pusher is not None:
                    self.pusher.push(hops, position, group, backend.faults.pushed(out))
                used = digest(hidden) if hidden.numel() <= 1 << 16 else await asyncio.to_thread(digest, hidden)
                metadata = {"type": "result", "position": position + hidden.shape[1], "input_digest": used,
                            "pushed": was_pushed}
                yield make_response(metadata, (out,))
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading  # it holds the reader: the caller's linger reads it next
            del self.pushed[session.push_key]

    async def _read_client(self, reader: asyncio.StreamReader, session: Session, max_bytes: int,
                           inputs: Inputs) -> None:
        try:
            while True:
                request = await self._next(reader, session, max_bytes)
                await inputs.from_client(Input(request=request))
                if request is None:
                    return
        except Exception as e:
            await inputs.from_client(Input(error=e))

    async def handle_push(self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Steps pushed by the previous peer of sessions' chains (swarm.server.push). A frame that is not a push
        at all ends the stream (its sender's pushes are lost, nobody else's); one for a session not here (closed
        meanwhile, or a key nobody drew), wrong for its session, or beyond what the session may hold waiting is
        dropped; a stream whose last MAX_UNKNOWN_PUSHES frames all named no session here is closed."""
        sender = info.peer_id.to_base58()
        if self.push_streams.total() >= MAX_PUSH_STREAMS or self.push_streams[sender] >= MAX_PEER_PUSH_STREAMS:
            writer.close()  # its pushes are lost; the clients' own copies go on
            return
        self.push_streams[sender] += 1
        unknown = 0
        try:
            while True:
                message = await self._receive_push(reader)
                if message is None:
                    return
                unknown = 0 if self._take_push(message) else unknown + 1
                if unknown >= MAX_UNKNOWN_PUSHES:
                    raise ValueError(f"{unknown} pushes in a row for no session here")
        except (TimeoutError, ValueError) as e:
            logger.info("push stream from %s closed: %s", sender, e or "idle")
        except (ConnectionError, OSError):
            logger.debug("push stream from %s went away", sender)
        except asyncio.CancelledError:  # the peer shutting down: the stream ends (Python 3.11's asyncio logs the
            logger.debug("push stream from %s cancelled", sender)  # cancelled task of a connection as an error)
        finally:
            self.push_streams[sender] -= 1
            if not self.push_streams[sender]:
                del self.push_streams[sender]
            writer.close()

    async def _receive_push(self, reader: asyncio.StreamReader) -> runtime_pb2.ExpertRequest | None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.limits.idle_timeout) as timer:
            try:
                return await receive_message(reader, runtime_pb2.ExpertRequest, MAX_PUSH_BYTES + MAX_FRAME_OVERHEAD,
                                             lambda: timer.reschedule(loop.time() + self.limits.frame_timeout))
            except EndOfStream:
                return None

    def _take_push(self, message: runtime_pb2.ExpertRequest) -> bool:
        """Queue one pushed frame for its session; False when it names no session here. ValueError if it is not
        a push frame at all; a push that is wrong only for its session (its tensor, its position) is dropped."""
        metadata = unpack_metadata(message.metadata)
        key = metadata.get("key")
        if metadata.get("type") != "push" or not isinstance(key, str) or not PUSH_KEY.fullmatch(key):
            raise ValueError("a push frame must be {'type': 'push', 'key': <32 hex>, ...}")
        target = self.pushed.get(key)
        backend = self.backend
        if target is None or backend is None:
            return False  # the session ended meanwhile
        session, inputs = target
        try:
            step = parse_step_number(metadata.get("step"))
            position = metadata.get("position")
            if step is None or not isinstance(position, int) or isinstance(position, bool) or position < 0:
                raise ValueError("a push frame must carry 'step' and 'position'")
            hops = parse_hops(metadata.get("next", []))
            group = parse_group(metadata.get("group"))
            if len(message.tensors) != 1:
                raise ValueError("a push frame carries exactly one tensor")
            hidden = decode_tensor(message.tensors[0], session.batch_size * backend.limits.max_chunk_tokens
                                   * backend.span.hidden_size)
        except (ValueError, PeerError) as e:
            logger.info("dropped a malformed push to session %s: %s", session.key, e)
            return True
        inputs.from_push(PushedStep(step, position, group, hops, hidden))
        return True

    @staticmethod
    def _metadata(request: runtime_pb2.ExpertRequest) -> dict:
        try:
            return unpack_metadata(request.metadata)
        except ValueError as e:
            raise bad_request(str(e)) from e

    @staticmethod
    def _parks(session: Session, request: runtime_pb2.ExpertRequest, metadata: dict) -> bool:
        """A park frame (swarm.protocol: park): the session is marked parked (nothing answered), or un-parked
        (answered "unparked")."""
        if metadata.get("type") not in ("park", "unpark"):
            return False
        if request.tensors:
            raise bad_request("a park message carries no tensor")
        session.parked = metadata["type"] == "park"
        return True

    @staticmethod
    def _parse_step(backend: SpanBackend, session: Session, request: runtime_pb2.ExpertRequest,
                    metadata: dict) -> tuple[torch.Tensor, int, tuple[str, int] | None]:
        """A client's step frame (its metadata unpacked): hidden, position and group (bad_request if malformed)."""
        try:
            if metadata.get("type") != "step":
                raise ValueError(f"expected a 'step' message, got {metadata.get('type')!r}")
            if len(request.tensors) != 1:
                raise ValueError(f"a step carries exactly one tensor, got {len(request.tensors)}")
            max_elements = session.batch_size * backend.limits.max_chunk_tokens * backend.span.hidden_size
            hidden = decode_tensor(request.tensors[0], max_elements)
        except ValueError as e:
            raise bad_request(str(e)) from e
        position = metadata.get("position")
        if not isinstance(position, int) or isinstance(position, bool):
            raise bad_request("'position' must be an integer")
        return hidden, position, parse_group(metadata.get("group"))

    async def _next(self, reader: asyncio.StreamReader, session: Session,
                    max_bytes: int) -> runtime_pb2.ExpertRequest | None:
        """The session's next message, None at end of stream; an idle client gets a timeout error and loses its
        session, and so does one whose session the backend ended (handed off, evicted: it fires the timer at once)."""
        if session.ended is not None:
            raise session.ended
        return await self._receive(reader, self.limits.idle_timeout, max_bytes, session)

    async def _receive(self, reader: asyncio.StreamReader, wait: float, max_bytes: int,
                       session: Session | None = None) -> runtime_pb2.ExpertRequest | None:
        """The next frame, None at end of stream. Its first byte must arrive within `wait` seconds; the rest, for a
        session, within frame_timeout of it (else within `wait` too: an open message is small)."""
        loop = asyncio.get_running_loop()
        started = False

        def start() -> None:
            nonlocal started
            started = True
            if session is not None:
                session.in_frame = True
                timer.reschedule(loop.time() + self.limits.frame_timeout)

        try:
            async with asyncio.timeout(wait) as timer:  # unlike wait_for, no extra task per message
                if session is not None:
                    session.idle_timer = timer
                return await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes, start)
        except EndOfStream:
            return None
        except ValueError as e:
            raise bad_request(str(e)) from e
        except TimeoutError:
            if session is None:
                raise PeerError(f"no open message within {wait:g} s; closed", ErrorCode.TIMEOUT) from None
            if session.ended is not None:
                raise session.ended from None
            if started:
                raise PeerError(f"a frame was not completed within {self.limits.frame_timeout:g} s of its first byte; "
                                "closed", ErrorCode.TIMEOUT) from None
            raise PeerError(f"session idle for {wait:.0f} s, closed", ErrorCode.TIMEOUT) from None
        finally:
            if session is not None:
                session.idle_timer, session.in_frame = None, False

    @staticmethod
    def _parse_open(request: runtime_pb2.ExpertRequest) -> OpenRequest:
        try:
            metadata = unpack_metadata(request.metadata)
            if request.tensors:
                raise ValueError("the open message carries no tensors")
            if metadata.get("version") != PROTOCOL_VERSION:
                version = metadata.get("version")
                raise PeerError(f"protocol version {version!r} is not supported, this peer speaks {PROTOCOL_VERSION}",
                                ErrorCode.VERSION)
            return OpenRequest.from_dict(metadata)
        except ValueError as e:
            raise bad_request(str(e)) from e

    @classmethod
    async def _step(cls, backend: SpanBackend, session: Session, request: runtime_pb2.ExpertRequest,
                    metadata: dict) -> runtime_pb2.ExpertResponse:
        hidden, position, group = cls._parse_step(backend, session, request, metadata)
        out = await backend.step(session, hidden, position, group)
        return make_response({"type": "result", "position": position + hidden.shape[1]}, (out,))

    async def _group_step(self, backend: SpanBackend, carrier: Session, request: runtime_pb2.ExpertRequest,
                          metadata: dict) -> runtime_pb2.ExpertResponse:
        """A group frame carried by `carrier`'s stream (swarm.protocol): each row stepped as its own session's step
        (the same checks, one round), answered in one frame. A row that cannot be taken (a handle not this client's
        over these blocks, a session with a step in flight, an invalid step) is refused alone: its error code in its
        place (a code only: 256 of them fit the metadata's bound), zeros in its row. A malformed frame is the
        carrier's error (bad_request)."""
        handles, positions = metadata.get("handles"), metadata.get("positions")
        if not isinstance(handles, list) or not isinstance(positions, list) or len(handles) != len(positions):
            raise bad_request("a group step carries 'handles' and 'positions', lists of one length")
        if not 1 <= len(handles) <= MAX_GROUP_ROWS:
            raise bad_request(f"a group step carries 1..{MAX_GROUP_ROWS} rows, got {len(handles)}")
        if len(set(map(repr, handles))) != len(handles):
            raise bad_request("a group step names a session twice")
        group = parse_group(metadata.get("group"))
        if len(request.tensors) != 1:
            raise bad_request(f"a group step carries exactly one tensor, got {len(request.tensors)}")
        try:
            hidden = decode_tensor(request.tensors[0], len(handles) * self.hidden_size)
        except ValueError as e:
            raise bad_request(str(e)) from e
        if tuple(hidden.shape) != (len(handles), 1, self.hidden_size):
            raise bad_request(f"a group step's hidden states must be [{len(handles)}, 1, {self.hidden_size}], "
                              f"got {list(hidden.shape)}")

        async def row(j: int) -> torch.Tensor:
            session = backend.member(handles[j], carrier)
            if session.idle_timer is not None and not session.in_frame:  # its own stream is quiet meanwhile
                session.idle_timer.reschedule(asyncio.get_running_loop().time() + self.limits.idle_timeout)
            return await backend.step(session, hidden[j : j + 1], positions[j], group)

        results = await asyncio.gather(*(row(j) for j in range(len(handles))), return_exceptions=True)
        out = torch.zeros_like(hidden)
        rows: list[object] = []
        for j, result in enumerate(results):
            if isinstance(result, torch.Tensor):
                out[j] = result[0]
                rows.append(positions[j] + 1)
            elif isinstance(result, PeerError):
                logger.debug("refused a group row of %s: %s", carrier.client, result)
                rows.append(str(result.code))
            elif isinstance(result, Exception):
                logger.error("a group row of %s failed", carrier.client, exc_info=result)
                rows.append(ErrorCode.INTERNAL.value)
            else:
                raise result
        return make_response({"type": "result", "rows": rows}, (out,))
