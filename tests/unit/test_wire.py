"""Wire formats refuse malformed input before building anything from it."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hivemind.proto import runtime_pb2

from swarm.codec import decode_tensor, encode_tensor, unpack_metadata
from swarm.protocol import MAX_PUSH_HOPS, Hop, OpenRequest, SpanInfo, parse_hops, parse_step_number


def test_tensor_roundtrip_is_bit_exact():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(2, 3, 8).to(dtype)
        assert torch.equal(decode_tensor(encode_tensor(x), max_elements=48), x)


def tensor_proto(**overrides):
    proto = encode_tensor(torch.zeros(1, 2, 4))
    for name, value in overrides.items():
        if name == "size":
            del proto.size[:]
            proto.size.extend(value)
        else:
            setattr(proto, name, value)
    return proto


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dtype": "int64"}, "dtype 'int64' is not accepted"),
        ({"dtype": "object"}, "not accepted"),
        ({"size": [8]}, r"must be \[batch, tokens, hidden\]"),
        ({"size": [1, 0, 4]}, "elements"),
        ({"size": [1000, 1000, 1000]}, "elements"),
        ({"buffer": b"\x00" * 7}, "buffer is 7 bytes"),
        ({"compression": runtime_pb2.CompressionType.FLOAT16}, "compressed"),
        ({"requires_grad": True}, "grad"),
    ],
)
def test_malformed_tensors_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        decode_tensor(tensor_proto(**overrides), max_elements=1024)


@pytest.mark.parametrize("raw", [b"\xc1\xff\x00", msgpack.packb([1, 2]), msgpack.packb({"x": "y" * 5000})])
def test_malformed_metadata_is_refused(raw):
    with pytest.raises(ValueError):
        unpack_metadata(raw)


def test_span_info_roundtrip_and_validation():
    info = SpanInfo(peer_id="p", model_id="m", start=0, end=15, num_blocks=30, hidden_size=576, dtype="float32",
                    quant="none", max_length=8192, kv_budget_tokens=10, free_kv_tokens=10, active_sessions=0)
    assert SpanInfo.from_dict(info.to_dict()) == info
    assert SpanInfo.from_dict({**info.to_dict(), "future_field": 1}) == info
    for bad in ({**info.to_dict(), "start": 20}, {**info.to_dict(), "end": "x"}, {"peer_id": "p"}, [1, 2]):
        with pytest.raises(ValueError):
            SpanInfo.from_dict(bad)


def test_open_request_parse():
    request = OpenRequest("s", 64, 1, 0, 6)
    assert OpenRequest.from_dict(request.to_dict()) == request
    for bad in ({"type": "step"}, {**request.to_dict(), "blocks": [0]}, {**request.to_dict(), "max_length": "9"},
                {**request.to_dict(), "batch_size": True}, {**request.to_dict(), "session_id": 5}):
        with pytest.raises(ValueError):
            OpenRequest.from_dict(bad)
    pushed = OpenRequest("s", 64, 1, 0, 6, push_key="0123456789abcdef" * 2)
    assert OpenRequest.from_dict(pushed.to_dict()) == pushed
    for key in ("x", "0123456789ABCDEF" * 2, "0" * 33, 5, ["0" * 32]):
        with pytest.raises(ValueError, match="push_key"):
            OpenRequest.from_dict({**pushed.to_dict(), "push_key": key})


def test_push_hops_and_step_numbers_are_bounded():
    hop = Hop("QmPeer1", "a" * 32, 3)
    assert parse_hops([hop.to_wire(), ("QmPeer2", "b" * 32, 1)]) == [hop, Hop("QmPeer2", "b" * 32, 1)]
    assert parse_hops([]) == []
    for bad in ("x", [hop.to_wire()] * (MAX_PUSH_HOPS + 1), [["QmPeer1", "a" * 32]], [["Qm/../x", "a" * 32, 1]],
                [["", "a" * 32, 1]], [["Qm" * 100, "a" * 32, 1]], [["QmPeer1", "A" * 32, 1]],
                [["QmPeer1", "a" * 32, 0]],
                [["QmPeer1", "a" * 32, True]], [["QmPeer1", "a" * 32, 1 << 60]], {"QmPeer1": 1}):
        with pytest.raises(ValueError):
            parse_hops(bad)
    assert parse_step_number(None) is None and parse_step_number(7) == 7
    for bad in (0, -1, True, 1.0, "1", 1 << 53):
        with pytest.raises(ValueError):
            parse_step_number(bad)


def read_frames(data: bytes, max_bytes: int = 1 << 20):
    import asyncio

    from swarm.codec import EndOfStream, receive_message

    async def scenario():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        out = []
        while True:
            try:
                out.append(await receive_message(reader, runtime_pb2.ExpertRequest, max_bytes))
            except EndOfStream:
                return out

    return asyncio.run(scenario())


def test_frames_roundtrip_and_end_of_stream():
    from swarm.codec import END_OF_STREAM, make_request

    message = make_request({"type": "step", "position": 3}, (torch.ones(1, 1, 4),))
    payload = message.SerializeToString()
    frame = b"\x00" + len(payload).to_bytes(8, "big") + payload
    assert read_frames(frame + frame + END_OF_STREAM + frame) == [message, message]
    assert read_frames(frame[:-3]) == []  # a truncated frame is the end of the stream, not a message


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00" + (1 << 40).to_bytes(8, "big"), "exceeds the limit"),
        (b"\x07" + (0).to_bytes(8, "big"), "malformed frame"),
        (b"\x00" + (3).to_bytes(8, "big") + b"\xff\xff\xff", "malformed protobuf"),
    ],
)
def test_bad_frames_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        read_frames(data)
