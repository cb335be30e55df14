"""Encode and decode the messages of the inference stream: msgpack metadata + hivemind tensor protobufs.

Decoding never trusts the sender: the declared dtype, shape and buffer length are checked against limits *before*
any tensor is built, so that a malformed or hostile message costs the receiver nothing but an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack
import torch
from google.protobuf.message import Message
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from swarm.protocol import WIRE_DTYPES

MAX_METADATA_BYTES = 4096
MAX_FRAME_OVERHEAD = 64 * 1024  # metadata + protobuf fields around a tensor's buffer
M = TypeVar("M", bound=Message)

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def frame_bytes(elements: int, dtype: torch.dtype) -> int:
    """The largest frame that carries one tensor of `elements` of `dtype` (and its metadata)."""
    return elements * torch.tensor([], dtype=dtype).element_size() + MAX_FRAME_OVERHEAD


def pack_metadata(data: dict[str, Any]) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def unpack_metadata(raw: bytes) -> dict[str, Any]:
    """Parse message metadata; raises ValueError if it is not a small msgpack dict."""
    if len(raw) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(raw)} bytes, the limit is {MAX_METADATA_BYTES}")
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True) if raw else {}
    except Exception as e:  # msgpack raises several unrelated exception types on garbage
        raise ValueError(f"metadata is not valid msgpack: {e}") from e
    if not isinstance(data, dict):
        raise ValueError("metadata must be a map")
    return data


def encode_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """Serialize losslessly (no compression): hidden states must arrive bit-exact. bfloat16 travels as its own
    2 bytes (hivemind's default would widen it to float32)."""
    tensor = tensor.detach().to("cpu").contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return runtime_pb2.Tensor(buffer=raw.numpy().tobytes(), size=tensor.shape, dtype=str(tensor.dtype)[6:],
                              compression=runtime_pb2.CompressionType.NONE)


def decode_tensor(proto: runtime_pb2.Tensor, max_elements: int) -> torch.Tensor:
    """Deserialize a hidden-state tensor after checking its declared dtype, size and buffer length."""
    if proto.dtype not in WIRE_DTYPES:
        raise ValueError(f"tensor dtype {proto.dtype!r} is not accepted; use one of {', '.join(WIRE_DTYPES)}")
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise ValueError("compressed tensors are not accepted")
    if proto.requires_grad:
        raise ValueError("tensors must not require grad")
    shape = list(proto.size)
    if len(shape) != 3:
        raise ValueError(f"hidden states must be [batch, tokens, hidden], got shape {shape}")
    numel = math.prod(shape)
    if numel == 0 or numel > max_elements:
        raise ValueError(f"tensor of shape {shape} has {numel} elements, allowed 1..{max_elements}")
    if len(proto.buffer) != numel * _ITEMSIZE[proto.dtype]:
        raise ValueError(f"tensor buffer is {len(proto.buffer)} bytes, shape {shape} of {proto.dtype} needs more")
    return deserialize_torch_tensor(proto)


def make_request(metadata: dict[str, Any], tensors: tuple[torch.Tensor, ...] = ()) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=pack_metadata(metadata), tensors=[encode_tensor(t) for t in tensors])


def make_response(metadata: dict[str, Any], tensors: tuple[torch.Tensor, ...] = ()) -> runtime_pb2.ExpertResponse:
    return runtime_pb2.ExpertResponse(metadata=pack_metadata(metadata), tensors=[encode_tensor(t) for t in tensors])


# Stream framing, byte-compatible with hivemind's protobuf streams: a marker byte (0: message, 1: error / end of
# stream), an 8-byte big-endian length, the serialized protobuf. Reading checks the length before buffering it.
_MESSAGE, _ERROR, _HEADER = b"\x00", b"\x01", 8


class EndOfStream(Exception):
    """The other side ended the stream (cleanly or by going away)."""


END_OF_STREAM = _ERROR + (0).to_bytes(_HEADER, "big")


async def send_message(writer: asyncio.StreamWriter, message: Message | None) -> None:
    """Write one message; None writes the end-of-stream marker."""
    if message is None:
        writer.write(END_OF_STREAM)
    else:
        payload = message.SerializeToString()
        writer.write(_MESSAGE + len(payload).to_bytes(_HEADER, "big"))
        writer.write(payload)
    await writer.drain()


async def receive_message(reader: asyncio.StreamReader, message_type: type[M],
                          max_bytes: int | Callable[[], int], started: Callable[[], None] | None = None) -> M:
    """Read one message; raises EndOfStream at the end and ValueError for a malformed or oversized frame.
    `max_bytes` may be a function, asked once the frame's length has arrived (what is due may change meanwhile);
    `started` is called when the frame's first byte has arrived (a reader's deadline for the rest starts then)."""
    try:
        marker = await reader.readexactly(1)
        if started is not None:
            started()
        length = int.from_bytes(await reader.readexactly(_HEADER), "big")
        limit = max_bytes() if callable(max_bytes) else max_bytes
        if length > limit:
            raise ValueError(f"message of {length} bytes exceeds the limit of {limit}")
        payload = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as e:
        raise EndOfStream() from e
    if marker == _ERROR:
        error = RPCError()
        with contextlib.suppress(Exception):
            error.ParseFromString(payload)
        if error.message:
            raise ValueError(f"the other side failed: {error.message}")
        raise EndOfStream()
    if marker != _MESSAGE:
        raise ValueError("malformed frame")
    message = message_type()
    try:
        message.ParseFromString(payload)
    except Exception as e:  # protobuf raises DecodeError and friends on garbage
        raise ValueError(f"malformed protobuf: {e}") from e
    return message


def digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's bytes (blake2b-64, hex): which input a peer computed a pushed step from."""
    data = tensor.detach().contiguous()
    raw = data.view(torch.int16) if data.dtype == torch.bfloat16 else data
    return hashlib.blake2b(raw.numpy().tobytes(), digest_size=8).hexdigest()
