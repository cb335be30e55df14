"""The peer's session logic without the network: admission, bounds, KV accounting."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.model.source import ModelSource
from swarm.model.span import load_span
from swarm.protocol import ErrorCode, OpenRequest, PeerError
from swarm.server.backend import Limits, SpanBackend
from swarm.server.memory import KVBudget, kv_bytes_per_token


@pytest.fixture
def backend(tiny_model_dir):
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 2, 6)
    backend = SpanBackend(span, Limits(max_sessions=3, max_length=64, max_batch=2, max_chunk_tokens=16),
                          KVBudget(200))
    yield backend
    backend.shutdown()


def open_request(**kw):
    args = {"session_id": "s", "max_length": 32, "batch_size": 1, "start": 2, "end": 6, **kw}
    return OpenRequest(**args)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"start": 0}, "not within this peer's 2:6"),
        ({"end": 7}, "not within"),
        ({"start": 4, "end": 4}, "not within"),
        ({"max_length": 0}, "max_length must be 1..64"),
        ({"max_length": 65}, "max_length must be 1..64"),
        ({"batch_size": 3}, "batch_size must be 1..2"),
        ({"session_id": ""}, "session_id"),
    ],
)
def test_bad_open_requests_are_refused(backend, kw, message):
    with pytest.raises(PeerError, match=message) as info:
        backend.open(open_request(**kw))
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert backend.budget.free == 200 and not backend.sessions


def test_admission_stops_at_budget_and_session_count_and_close_frees(backend):
    first = backend.open(open_request(max_length=64, batch_size=2))  # 128 of 200 tokens
    with pytest.raises(PeerError, match="KV budget exhausted") as info:
        backend.open(open_request(max_length=64, batch_size=2))
    assert info.value.code == ErrorCode.CAPACITY
    others = [backend.open(open_request(max_length=10)) for _ in range(2)]
    with pytest.raises(PeerError, match="maximum of 3 sessions"):
        backend.open(open_request(max_length=1))
    for session in [first, *others]:
        backend.close(session)
    assert backend.budget.free == 200 and not backend.sessions


@pytest.mark.parametrize(
    ("shape", "position", "message"),
    [
        ((2, 1, 64), 0, "batch 2 differs"),
        ((1, 1, 32), 0, "hidden size 32 differs"),
        ((1, 17, 64), 0, "17 new tokens in one step"),
        ((1, 1, 64), 1, r"position 1 is outside 0..0"),
        ((1, 1, 64), -1, "outside"),
        ((1, 1, 64), "0", "must be an integer"),
    ],
)
def test_bad_steps_are_refused(backend, shape, position, message):
    session = backend.open(open_request(max_length=20))
    with pytest.raises(PeerError, match=message):
        asyncio.run(backend.step(session, torch.zeros(shape), position))


def test_nan_and_overlong_steps_are_refused_and_the_session_still_works(backend):
    session = backend.open(open_request(max_length=20))
    with pytest.raises(PeerError, match="NaN"):
        asyncio.run(backend.step(session, torch.full((1, 2, 64), float("nan")), 0))
    out = asyncio.run(backend.step(session, torch.randn(1, 16, 64), 0))
    assert out.shape == (1, 16, 64) and session.cache.length == 16
    with pytest.raises(PeerError, match="exceeds max_length 20"):
        asyncio.run(backend.step(session, torch.randn(1, 5, 64), 16))
    out = asyncio.run(backend.step(session, torch.randn(1, 4, 64), 16))
    assert session.cache.length == 20


def test_kv_bytes_per_token_matches_what_the_cache_holds(backend, tiny_model_dir):
    from swarm.model.anatomy import load_config

    session = backend.open(open_request(max_length=64))
    for position in range(0, 64, 16):
        asyncio.run(backend.step(session, torch.randn(1, 16, 64), position))
    per_token = kv_bytes_per_token(load_config(tiny_model_dir("llama")), 4, torch.float32)
    assert session.cache.nbytes() == 64 * per_token
