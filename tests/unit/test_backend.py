"""The peer's session logic without the network: admission, bounds, KV accounting."""

from __future__ import annotations

import asyncio
import threading

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


def test_a_groups_size_counts_only_its_clients_sessions_over_the_same_blocks(backend):
    a1, a2 = backend.open(open_request(max_length=8), "a"), backend.open(open_request(max_length=8), "a")
    b = backend.open(open_request(max_length=8), "b")
    assert backend._own_group(a1, ("round", 64)) == ("round", 2)
    assert backend._own_group(b, ("round", 64)) == ("round", 1)
    assert backend._own_group(a2, ("round", 1)) == ("round", 1) and backend._own_group(a2, None) is None
    backend.close(a2)
    backend.close(a2)  # twice: counted once
    assert backend._own_group(a1, ("round", 64)) == ("round", 1)
    other_blocks = backend.open(open_request(max_length=8, start=3), "a")
    assert backend._own_group(other_blocks, ("round", 64)) == ("round", 1)
    assert backend._own_group(a1, ("round", 64)) == ("round", 1)
    for session in (a1, b, other_blocks):
        backend.close(session)
    assert not backend.sessions and not backend._per_client


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


async def test_concurrent_decode_steps_run_as_one_batch_and_equal_each_alone(tiny_model_dir):
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    backend = SpanBackend(span, Limits(max_sessions=8, max_length=64, max_chunk_tokens=64, prefill_chunk=4),
                          KVBudget(4096))
    reference = SpanBackend(span, Limits(max_sessions=8, max_length=64, max_batch_sessions=1), KVBudget(4096))
    try:
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randn(1, n, 64, generator=g) for n in (5, 11, 2, 8, 7, 3)]
        sessions = [backend.open(open_request(session_id=f"s{i}", start=0, end=6)) for i in range(6)]
        alone = [reference.open(open_request(session_id=f"r{i}", start=0, end=6)) for i in range(6)]
        # prefills longer than prefill_chunk (4) run in chunks; the result is the same as in one piece
        firsts = await asyncio.gather(*(backend.step(s, p, 0) for s, p in zip(sessions, prompts, strict=True)))
        for r, p, first in zip(alone, prompts, firsts, strict=True):
            torch.testing.assert_close(first, await reference.step(r, p, 0), atol=1e-5, rtol=0)
        positions = [p.shape[1] for p in prompts]
        for _ in range(4):
            steps = [torch.randn(1, 1, 64, generator=g) for _ in sessions]
            got = await asyncio.gather(*(backend.step(s, x, pos)
                                         for s, x, pos in zip(sessions, steps, positions, strict=True)))
            for r, x, pos, out in zip(alone, steps, positions, got, strict=True):
                torch.testing.assert_close(out, await reference.step(r, x, pos), atol=1e-5, rtol=0)
            positions = [p + 1 for p in positions]
        assert max(backend.batch_sizes) == 6, backend.batch_sizes  # all six sessions in one forward
        assert not reference.batch_sizes  # batching off: every step alone
        # a session closed while its step waits in the queue is skipped, the others still get their results
        x = [torch.randn(1, 1, 64, generator=g) for _ in sessions]
        waiting = [asyncio.ensure_future(backend.step(s, xi, pos)) for s, xi, pos in zip(sessions, x, positions,
                                                                                         strict=True)]
        waiting[0].cancel()
        backend.close(sessions[0])
        results = await asyncio.gather(*waiting[1:])
        assert all(r.shape == (1, 1, 64) and torch.isfinite(r).all() for r in results)
    finally:
        backend.shutdown()
        reference.shutdown()


async def test_a_group_of_decode_steps_runs_as_one_forward_once_complete_and_waits_for_no_one_else(tiny_model_dir):
    """Steps sent as a group (our client's lockstep groups) run together as soon as the last member arrives, even
    while other sessions are decoding: those are another group, computing elsewhere in the chain. A member that
    never comes is waited for at most batch_wait."""
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    # batch_wait 10 s while the group must not wait for sessions 3 and 4 (a wait would show as seconds), 0.5 s where
    # two members of a group of three must wait for it (the third never comes)
    backend = SpanBackend(span, Limits(max_sessions=8, max_length=64, batch_wait=10.0), KVBudget(4096))
    try:
        g = torch.Generator().manual_seed(5)
        sessions = [backend.open(open_request(session_id=f"s{i}", start=0, end=6)) for i in range(5)]
        for s in sessions:
            await backend.step(s, torch.randn(1, 3, 64, generator=g), 0)
        loop = asyncio.get_running_loop()

        async def later(session, position, group, delay):
            await asyncio.sleep(delay)
            return await backend.step(session, torch.randn(1, 1, 64, generator=g), position, group)

        # ungrouped decoding sessions 3 and 4 are known to the batcher (each sent a decode step just now)
        await asyncio.gather(*(backend.step(s, torch.randn(1, 1, 64, generator=g), 3) for s in sessions[3:]))
        start = loop.time()
        await asyncio.gather(*(later(s, 3, ("round-1", 3), 0.05 * i) for i, s in enumerate(sessions[:3])))
        assert backend.batch_sizes[-1] == 3 and len(backend.batch_sizes) == 2  # one forward for the three
        assert loop.time() - start < 5  # not waiting for sessions 3 and 4 (batch_wait is 10 s)

        # two members of a group of three: they run after batch_wait, without the third
        backend.scheduler.batch_wait = 0.5
        start = loop.time()
        outs = await asyncio.wait_for(asyncio.gather(*(later(s, 4, ("round-2", 3), 0) for s in sessions[:2])), 30)
        assert loop.time() - start >= 0.45 and backend.batch_sizes[-1] == 2
        assert all(o.shape == (1, 1, 64) for o in outs)

        # groups that are complete together share a forward; a group's result equals each step run alone
        steps = [torch.randn(1, 1, 64, generator=g) for _ in sessions[:4]]
        grouped = await asyncio.gather(*(backend.step(s, x, 5 if i < 2 else 4, ("a" if i < 2 else "b", 2))
                                         for i, (s, x) in enumerate(zip(sessions[:4], steps, strict=True))))
        assert backend.batch_sizes[-1] == 4
        for i, (s, x, out) in enumerate(zip(sessions[:4], steps, grouped, strict=True)):
            alone = span(x, s.cache, 5 if i < 2 else 4)  # the same position again, alone: rewinds one token
            torch.testing.assert_close(out, alone, atol=1e-5, rtol=0)
    finally:
        backend.shutdown()


async def test_a_group_larger_than_a_forward_runs_as_several_without_waiting_for_members_already_computed(
        tiny_model_dir):
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    # batch_wait 10 s: waiting for members already computed would show as seconds, not a few ms on a busy machine
    backend = SpanBackend(span, Limits(max_sessions=8, max_length=64, batch_wait=10.0, max_batch_sessions=3),
                          KVBudget(4096))
    try:
        sessions = [backend.open(open_request(session_id=f"s{i}", start=0, end=6)) for i in range(5)]
        for s in sessions:
            await backend.step(s, torch.randn(1, 2, 64), 0)
        start = asyncio.get_running_loop().time()
        await asyncio.gather(*(backend.step(s, torch.randn(1, 1, 64), 2, ("big", 5)) for s in sessions))
        assert backend.batch_sizes[-2:] == [3, 2]
        assert asyncio.get_running_loop().time() - start < 5  # the last two did not wait for the first three
        assert not backend.scheduler._arrived  # a complete group's count is forgotten once it has run
    finally:
        backend.shutdown()


async def test_a_burst_of_prompts_does_not_stall_decoding_and_short_prompts_pass_long_ones(tiny_model_dir):
    """The scheduler's order, not timing: a round is the ready decode batch, then prefill chunks up to one chunk's
    tokens. Decode steps never wait behind a burst of prompts, and a one-chunk prompt does not wait for a long one."""
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    limits = Limits(max_sessions=16, max_length=512, max_chunk_tokens=512, prefill_chunk=8)
    backend = SpanBackend(span, limits, KVBudget(16384))
    reference = SpanBackend(span, limits, KVBudget(16384))
    try:
        g = torch.Generator().manual_seed(7)
        decoders = [backend.open(open_request(session_id=f"d{i}", start=0, end=6, max_length=512)) for i in range(3)]
        for d in decoders:
            await backend.step(d, torch.randn(1, 4, 64, generator=g), 0)
        prompts = [torch.randn(1, 256 if i == 0 else 8, 64, generator=g) for i in range(8)]  # 32 chunks, then 1s
        arriving = [backend.open(open_request(session_id=f"p{i}", start=0, end=6, max_length=512)) for i in range(8)]
        prefills = [asyncio.ensure_future(backend.step(a, p, 0)) for a, p in zip(arriving, prompts, strict=True)]
        await asyncio.sleep(0)  # the burst is queued
        await asyncio.gather(*(backend.step(d, torch.randn(1, 1, 64, generator=g), 4) for d in decoders))
        assert sum(p.done() for p in prefills) <= 2  # the decode round ran after one chunk, not after the burst
        await asyncio.gather(*prefills[1:])
        assert not prefills[0].done()  # the one-chunk prompts did not wait for the 32-chunk one
        alone = reference.open(open_request(session_id="alone", start=0, end=6, max_length=512))
        torch.testing.assert_close(await prefills[0], await reference.step(alone, prompts[0], 0), atol=1e-5, rtol=0)
    finally:
        backend.shutdown()
        reference.shutdown()


async def test_a_round_of_decode_steps_and_prompt_chunks_is_one_forward_and_equals_each_alone(tiny_model_dir):
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 0, 6)
    limits = Limits(max_sessions=8, max_length=64, prefill_chunk=8, batch_wait=5.0)
    backend = SpanBackend(span, limits, KVBudget(4096))
    reference = SpanBackend(span, Limits(max_sessions=8, max_length=64, max_batch_sessions=1), KVBudget(4096))
    try:
        g = torch.Generator().manual_seed(9)
        history = [torch.randn(1, n, 64, generator=g) for n in (5, 9, 2)]
        names = ["d0", "d1", "d2", "p0", "p1"]
        sessions = {n: backend.open(open_request(session_id=n, start=0, end=6)) for n in names}
        alone = {n: reference.open(open_request(session_id=n, start=0, end=6)) for n in names}
        for name, h in zip(names, history, strict=False):
            await backend.step(sessions[name], h, 0)
            await reference.step(alone[name], h, 0)
        inputs = {"d0": (torch.randn(1, 1, 64, generator=g), 5), "d1": (torch.randn(1, 1, 64, generator=g), 9),
                  "d2": (torch.randn(1, 1, 64, generator=g), 2), "p0": (torch.randn(1, 4, 64, generator=g), 0),
                  "p1": (torch.randn(1, 3, 64, generator=g), 0)}
        forwards = backend.steps
        # the decode steps come as one group of three: the round waits for all of them (batch_wait is 5 s), and
        # the two prompts (7 tokens, within the round's 8) join it
        got = await asyncio.gather(*(backend.step(sessions[n], x, pos, ("g", 3) if n.startswith("d") else None)
                                     for n, (x, pos) in inputs.items()))
        assert backend.steps - forwards <= 2 and backend.batch_sizes[-1] == 3  # prompts queued first may go ahead
        for (name, (x, pos)), out in zip(inputs.items(), got, strict=True):
            torch.testing.assert_close(out, await reference.step(alone[name], x, pos), atol=1e-5, rtol=0)
        forwards = backend.steps
        await asyncio.gather(*(backend.step(sessions[n], torch.randn(1, 1, 64, generator=g), pos, ("h", 3))
                               for n, pos in (("d0", 6), ("d1", 10), ("d2", 3))),
                             backend.step(sessions["p0"], torch.randn(1, 2, 64, generator=g), 4))
        assert backend.steps - forwards == 1  # a group and a chunk arriving together: one forward
    finally:
        backend.shutdown()
        reference.shutdown()


@pytest.mark.parametrize("group", [["x"], ["", 2], ["x", 0], ["x", True], [3, 2], ["x" * 65, 2], "x", ["x", 2000]])
def test_a_malformed_group_is_a_bad_request(group):
    from swarm.protocol import parse_group

    with pytest.raises(PeerError, match="'group' must be") as info:
        parse_group(group)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert parse_group(["x", 2]) == ("x", 2) and parse_group(None) is None


async def test_sessions_reserve_kv_as_they_grow_and_wait_a_bounded_time_for_it(tiny_model_dir):
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 2, 6)
    backend = SpanBackend(span, Limits(max_sessions=8, max_length=512, max_chunk_tokens=256, admission_wait=0.5),
                          KVBudget(256))
    try:
        a = await backend.admit(open_request(session_id="a", max_length=250))
        b = await backend.admit(open_request(session_id="b", max_length=250))
        assert backend.budget.reserved == {a.key: 128, b.key: 128} and backend.budget.free == 0  # not 250 each

        async def close_b_soon():
            await asyncio.sleep(0.1)
            backend.close(b)

        closer = asyncio.ensure_future(close_b_soon())
        c = await backend.admit(open_request(session_id="c", max_length=100))  # waits for b's budget
        await closer
        assert c.key in backend.sessions and backend.budget.free == 28
        await backend.step(a, torch.randn(1, 128, 64), 0)  # within a's first chunk
        with pytest.raises(PeerError, match="needs 250 tokens to grow to 129") as info:  # c holds the rest
            await backend.step(a, torch.randn(1, 1, 64), 128)
        assert info.value.code == ErrorCode.CAPACITY
        with pytest.raises(PeerError, match="may need 1024 tokens, this peer's budget is 256"):
            await backend.admit(open_request(session_id="d", max_length=512, batch_size=2))
        start = asyncio.get_running_loop().time()
        with pytest.raises(PeerError, match="to start"):
            await backend.admit(open_request(session_id="e", max_length=200))
        assert asyncio.get_running_loop().time() - start >= 0.45  # waited admission_wait (0.5 s), then refused
        backend.close(c)
        out = await backend.step(a, torch.randn(1, 1, 64), 128)  # budget freed: a grows now
        assert out.shape == (1, 1, 64) and backend.budget.reserved[a.key] == 250  # capped at max_length
    finally:
        backend.shutdown()


async def test_parked_sessions_make_room_at_once_for_new_and_growing_ones_least_recently_stepped_first(
        tiny_model_dir):
    """A parked session (swarm.protocol: park) is a cache its client let go of: a new session takes its slot without
    waiting (the least recently stepped goes first, never the source of the fork being opened; a fork finding no
    room is refused at once), a growing one its KV, and a step un-parks it."""
    span = load_span(ModelSource("tiny", tiny_model_dir("llama")), 2, 6)
    backend = SpanBackend(span, Limits(max_sessions=3, max_length=512, max_chunk_tokens=256, admission_wait=2.0),
                          KVBudget(3 * 128 + 64))
    loop = asyncio.get_running_loop()
    try:
        old, recent, live = [await backend.admit(open_request(session_id=s, max_length=250)) for s in "orl"]
        for session in (old, recent, live):
            await backend.step(session, torch.randn(1, 8, 64), 0)
        old.parked = recent.parked = True
        start = loop.time()
        new = await backend.admit(open_request(session_id="n", max_length=250))  # the peer is full: old goes
        assert loop.time() - start < 0.5  # not admission_wait
        assert old.key not in backend.sessions and old.ended.code == ErrorCode.CAPACITY and "parked" in str(old.ended)
        assert {recent.key, live.key, new.key} == set(backend.sessions)
        # a fork of the last parked session when nothing else may go: refused at once, its source kept
        start = loop.time()
        with pytest.raises(PeerError) as info:
            await backend.admit(open_request(session_id="f", max_length=250, fork=(recent.handle, 8, "r")))
        assert info.value.code == ErrorCode.CAPACITY and loop.time() - start < 0.5
        assert recent.key in backend.sessions
        # a step un-parks: nothing parked is left, so the next session waits (admission_wait) and is refused
        await backend.step(recent, torch.randn(1, 1, 64), 8)
        assert not recent.parked
        start = loop.time()
        with pytest.raises(PeerError, match="maximum of 3"):
            await backend.admit(open_request(session_id="w", max_length=250))
        assert loop.time() - start >= 1.9
        # KV: live grows past its first 128 tokens (64 free) into what a parked session holds
        recent.parked = True
        await backend.step(live, torch.randn(1, 128, 64), 8)
        assert recent.key not in backend.sessions and backend.budget.reserved[live.key] == 250
    finally:
        backend.shutdown()


async def test_a_draining_peer_refuses_new_sessions_and_hands_off_live_ones(backend):
    live = backend.open(open_request())
    await backend.step(live, torch.randn(1, 4, 64), 0)
    backend.drain("moving to 10:20")
    with pytest.raises(PeerError, match="moving to 10:20") as info:
        backend.open(open_request())
    assert info.value.code == ErrorCode.MOVED
    # a live session goes on while the peer drains...
    await backend.step(live, torch.randn(1, 1, 64), 4)
    assert backend.hand_off("moving to 10:20") == 1
    # ...until it is handed off: memory freed, the next step refused with MOVED (the client replays elsewhere)
    assert not backend.sessions and backend.budget.free == 200
    with pytest.raises(PeerError, match="moving") as info:
        await backend.step(live, torch.randn(1, 1, 64), 5)
    assert info.value.code == ErrorCode.MOVED


def test_throughput_probe_runs_real_steps_and_is_cached(backend, tmp_path):
    from swarm.server import throughput

    calls = []

    def measured():
        calls.append(1)
        return throughput.measure(throughput.probe(backend, prefix=16), num_blocks=4, repeats=2)

    path = tmp_path / "throughput.json"
    first = throughput.cached_or_measured("k", measured, path=path)
    assert first.single > 0 and first.batched > 0
    assert backend.steps == 0 and not backend.batch_sizes  # probes are not served steps
    assert throughput.cached_or_measured("k", measured, path=path) == first and len(calls) == 1
    assert throughput.cached_or_measured("k", measured, refresh=True, path=path) and len(calls) == 2
    assert throughput.cached_or_measured("other", measured, path=path) and len(calls) == 3
    path.write_text("{not json")  # a damaged cache is measured over, not fatal
    assert throughput.cached_or_measured("k", measured, path=path) and len(calls) == 4


def test_a_slow_peer_measures_slow(backend):
    from swarm.server import throughput

    quick = throughput.measure(throughput.probe(backend, prefix=16), num_blocks=4, repeats=2)
    backend.faults.step_delay = 0.05
    slow = throughput.measure(throughput.probe(backend, prefix=16), num_blocks=4, repeats=2)
    assert slow.single < 4 / 0.05 and slow.single < quick.single


async def test_a_drain_hands_off_idle_sessions_first(backend):
    idle, busy = backend.open(open_request()), backend.open(open_request())
    for session in (idle, busy):
        await backend.step(session, torch.randn(1, 2, 64), 0)
    idle.last_step -= 10  # parked by its client 10 s ago
    assert backend.hand_off("moving", idle_for=2.0) == 1
    assert idle.ended and not busy.ended and list(backend.sessions.values()) == [busy]
    await backend.step(busy, torch.randn(1, 1, 64), 2)  # the busy one goes on


def test_peers_of_one_machine_measure_one_at_a_time(tmp_path):
    """Two peers starting together: the second waits for the first's measurement and reuses it."""
    import time as time_module

    from swarm.server import throughput

    running, calls = [], []

    def measure():
        running.append(1)
        calls.append(len(running))  # how many measurements run right now, this one included
        time_module.sleep(0.2)
        running.pop()
        return throughput.Throughput(100.0 + len(calls), 400.0)

    results = []
    path = tmp_path / "throughput.json"
    threads = [threading.Thread(target=lambda: results.append(throughput.cached_or_measured("k", measure,
                                                                                          path=path)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and len(set(results)) == 1  # one measurement, never two at once, everyone got it
