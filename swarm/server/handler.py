"""The peer's RPC handlers over hivemind P2P: the inference stream and the info call.

A request the peer cannot honour gets an `error` message with a code and a human-readable reason, then the stream
ends and the session's memory is freed; other sessions never notice. Only unexpected failures are logged with a
traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from swarm.codec import (
    MAX_FRAME_OVERHEAD,
    EndOfStream,
    decode_tensor,
    make_response,
    pack_metadata,
    receive_message,
    send_message,
    unpack_metadata,
)
from swarm.protocol import (
    INFERENCE_HANDLER,
    INFO_HANDLER,
    MAX_GROUP_ID,
    MAX_GROUP_SIZE,
    PROTOCOL_VERSION,
    ErrorCode,
    OpenRequest,
    PeerError,
    SpanInfo,
)
from swarm.server.backend import Session, SpanBackend, bad_request

logger = logging.getLogger(__name__)

LINGER_SECONDS = 10.0


class SpanHandler:
    def __init__(self, backend: SpanBackend, info: Callable[[], SpanInfo], idle_timeout: float,
                 allowed_clients: set[str] | None = None):
        self.backend: SpanBackend | None = backend  # None while the peer loads other blocks
        self.hidden_size = backend.span.hidden_size
        self.max_step_elements = backend.limits.max_step_elements
        self.info = info
        self.idle_timeout = idle_timeout
        self.allowed_clients = allowed_clients or set()  # empty: anyone

    async def register(self, p2p: P2P) -> None:
        # The inference stream reads and writes frames directly (hivemind's framing): no per-message tasks or
        # queues between the socket and the session, and a frame's declared size is checked before it is read.
        await p2p.add_binary_stream_handler(INFERENCE_HANDLER, self.handle_stream)
        await p2p.add_protobuf_handler(INFO_HANDLER, self.rpc_info, runtime_pb2.ExpertUID)

    @property
    def max_frame_bytes(self) -> int:
        return self.max_step_elements * self.hidden_size * 4 + MAX_FRAME_OVERHEAD

    async def handle_stream(self, info: StreamInfo, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while True:
                try:
                    yield await receive_message(reader, runtime_pb2.ExpertRequest, self.max_frame_bytes)
                except EndOfStream:
                    return
                except ValueError as e:
                    raise bad_request(str(e)) from e

        try:
            async for response in self.inference(requests(), info.peer_id):
                await send_message(writer, response)
            # Half-close, then give the client a moment to read what is in flight (an error's reason) and hang up:
            # closing outright resets the stream, and a reset may drop the last message before it is read.
            if writer.can_write_eof():
                writer.write_eof()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINGER_SECONDS):
                    while await reader.read(1 << 16):  # discard, never buffer, whatever still arrives
                        pass
        except (ConnectionError, OSError):
            logger.debug("client %s went away", info.peer_id)
        finally:
            writer.close()

    async def rpc_info(self, request: runtime_pb2.ExpertUID, context: P2PContext) -> runtime_pb2.ExpertInfo:
        return runtime_pb2.ExpertInfo(serialized_info=pack_metadata(self.info().to_dict()))

    async def inference(
        self, requests: AsyncIterator[runtime_pb2.ExpertRequest], remote_id: PeerID
    ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session, backend = None, None
        try:
            if self.allowed_clients and remote_id.to_base58() not in self.allowed_clients:
                raise PeerError(f"client {remote_id} is not allowed on this peer", ErrorCode.FORBIDDEN)
            first = await self._next(requests)
            if first is None:
                return
            backend = self.backend  # a peer that moves gets a new backend; this session stays on its own
            if backend is None:
                raise PeerError("this peer is loading other blocks; route elsewhere", ErrorCode.MOVED)
            session = await backend.admit(self._parse_open(first))
            yield make_response({"type": "opened", "session_id": session.session_id, "max_length": session.max_length,
                                 "blocks": [backend.span.start + session.blocks.start,
                                            backend.span.start + session.blocks.stop]})
            while (request := await self._next(requests, session)) is not None:
                yield await self._step(backend, session, request)
        except PeerError as e:
            logger.info("refused a request from %s: %s", remote_id, e)
            yield make_response({"type": "error", "code": str(e.code), "message": str(e)})
        except Exception as e:
            logger.exception("session from %s failed", remote_id)
            # the traceback stays in this peer's log: a client (anyone) learns only that the step failed
            yield make_response({"type": "error", "code": ErrorCode.INTERNAL.value,
                                 "message": f"the peer failed this request ({type(e).__name__})"})
        finally:
            if session is not None and backend is not None:
                backend.close(session)

    async def _next(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                    session: Session | None = None) -> runtime_pb2.ExpertRequest | None:
        """The next message, None at end of stream; an idle client gets a timeout error and loses its session, and
        so does one whose session was handed off (the backend fires the timer at once)."""
        try:
            if session is not None and session.moved:
                raise TimeoutError
            async with asyncio.timeout(self.idle_timeout) as timer:  # unlike wait_for, no extra task per message
                if session is not None:
                    session.idle_timer = timer
                return await anext(requests)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            if session is not None and session.moved:
                raise PeerError(session.moved, ErrorCode.MOVED) from None
            raise PeerError(f"session idle for {self.idle_timeout:.0f} s, closed", ErrorCode.TIMEOUT) from None
        finally:
            if session is not None:
                session.idle_timer = None

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

    @staticmethod
    async def _step(backend: SpanBackend, session: Session,
                    request: runtime_pb2.ExpertRequest) -> runtime_pb2.ExpertResponse:
        try:
            metadata = unpack_metadata(request.metadata)
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
        out = await backend.step(session, hidden, position, parse_group(metadata.get("group")))
        return make_response({"type": "result", "position": position + hidden.shape[1]}, (out,))


def parse_group(group: object) -> tuple[str, int] | None:
    """A step's optional `group`: [id, size] of the group of decode steps its client sent it with."""
    if group is None:
        return None
    if (not isinstance(group, list | tuple) or len(group) != 2 or not isinstance(group[0], str)
            or not 0 < len(group[0]) <= MAX_GROUP_ID or not isinstance(group[1], int) or isinstance(group[1], bool)
            or not 1 <= group[1] <= MAX_GROUP_SIZE):
        raise bad_request(f"'group' must be [id of 1..{MAX_GROUP_ID} characters, size 1..{MAX_GROUP_SIZE}]")
    return group[0], group[1]
