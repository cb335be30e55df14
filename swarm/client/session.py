"""Inference sessions: one persistent stream per peer of a chain, hidden states passed along it step by step.

    session = await InferenceSession.open(p2p, chain, max_length=512)
    hidden = await session.step(embeddings)         # [B, T, H] at the next position → [B, T, H] after all blocks
    await session.close()                            # the peers free the session's KV cache
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.control import P2PHandlerError
from hivemind.proto import runtime_pb2

from swarm.client.routing import Link
from swarm.codec import decode_tensor, make_request, unpack_metadata
from swarm.protocol import INFERENCE_HANDLER, ErrorCode, OpenRequest, PeerError

logger = logging.getLogger(__name__)


class PeerStream:
    """The stream of one session to one peer, for blocks [link.start, link.end)."""

    def __init__(self, link: Link, requests: asyncio.Queue, responses: AsyncIterator[runtime_pb2.ExpertResponse]):
        self.link = link
        self._requests = requests
        self._responses = responses
        self.closed = False

    @classmethod
    async def open(cls, p2p: P2P, link: Link, request: OpenRequest, timeout: float) -> PeerStream:
        queue: asyncio.Queue = asyncio.Queue()

        async def requests() -> AsyncIterator[runtime_pb2.ExpertRequest]:
            while (item := await queue.get()) is not None:
                yield item

        peer_id = PeerID.from_base58(link.peer.peer_id)
        try:
            responses = await asyncio.wait_for(
                p2p.iterate_protobuf_handler(peer_id, INFERENCE_HANDLER, requests(), runtime_pb2.ExpertResponse),
                timeout,
            )
        except (TimeoutError, P2PHandlerError, OSError, ConnectionError) as e:
            raise PeerError(f"cannot reach peer {link.peer.peer_id}: {e!r}", peer_id=link.peer.peer_id) from e
        stream = cls(link, queue, responses)
        queue.put_nowait(make_request(request.to_dict()))
        await stream._receive(timeout, expected="opened")
        return stream

    async def step(self, hidden: torch.Tensor, position: int, timeout: float) -> torch.Tensor:
        self._requests.put_nowait(make_request({"type": "step", "position": position}, (hidden,)))
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

    async def _receive(self, timeout: float, expected: str) -> runtime_pb2.ExpertResponse:
        try:
            response = await asyncio.wait_for(anext(self._responses), timeout)
        except StopAsyncIteration:
            raise self._error("closed the stream") from None
        except TimeoutError:
            raise self._error(f"did not answer within {timeout:.1f} s") from None
        except (P2PHandlerError, OSError, ConnectionError) as e:
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
        if not self.closed:
            self.closed = True
            self._requests.put_nowait(None)
        with contextlib.suppress(Exception):
            await self._responses.aclose()


class InferenceSession:
    """A session over a whole chain: `step` runs new tokens' hidden states through every block."""

    def __init__(self, streams: list[PeerStream], max_length: int, batch_size: int, step_timeout: float):
        self.streams = streams
        self.max_length = max_length
        self.batch_size = batch_size
        self.step_timeout = step_timeout
        self.position = 0  # tokens every peer has cached

    @classmethod
    async def open(cls, p2p: P2P, chain: list[Link], max_length: int, batch_size: int = 1,
                   timeout: float = 30.0) -> InferenceSession:
        session_id = uuid.uuid4().hex
        opened = await asyncio.gather(
            *(PeerStream.open(p2p, link, OpenRequest(session_id, max_length, batch_size, link.start, link.end), timeout)
              for link in chain),
            return_exceptions=True,
        )
        streams = [s for s in opened if isinstance(s, PeerStream)]
        failures = [e for e in opened if isinstance(e, BaseException)]
        if failures:
            await asyncio.gather(*(s.close() for s in streams))
            raise failures[0]
        return cls(streams, max_length, batch_size, timeout)

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        """hidden: [B, T, H] of tokens at `position` (default: right after the cached ones) → last block's output."""
        position = self.position if position is None else position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside 0..{self.position}")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(f"{position + hidden.shape[1]} tokens exceed the session's max_length {self.max_length}")
        for stream in self.streams:
            hidden = await stream.step(hidden, position, self.step_timeout)
        self.position = position + hidden.shape[1]
        return hidden

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self.streams))

    async def __aenter__(self) -> InferenceSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
