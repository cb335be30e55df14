"""A peer's round trips to the peers that may follow it (swarm.server.latency), with a fake probe and clock."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from swarm.protocol import MAX_NEXT_RTT, SpanInfo
from swarm.server import latency
from swarm.server.latency import NextHops


def record(peer: str, start: int, end: int, push: bool = True, state: str = "online") -> SpanInfo:
    return SpanInfo(peer_id=peer, model_id="m", start=start, end=end, num_blocks=30, hidden_size=8, dtype="float32",
                    quant="none", max_length=64, kv_budget_tokens=1000, free_kv_tokens=1000, active_sessions=0,
                    push=push, state=state)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ME = record("me", 0, 15)


def test_candidates_are_the_peers_that_can_follow_and_take_pushes():
    spans = [ME, record("next", 15, 30), record("overlap", 10, 20), record("covers", 0, 30), record("ends", 5, 15),
             record("gap", 16, 30), record("old", 15, 30, push=False), record("leaving", 15, 30, state="draining")]
    assert NextHops.candidates(spans, ME) == ["next", "overlap", "covers"]


async def test_rounds_probe_a_few_never_probed_first_and_announce_the_lowest_fresh_round_trips():
    clock, calls = Clock(), []
    rtts = {f"p{i}": 0.01 * (i + 1) for i in range(10)}

    async def probe(peer):
        calls.append(peer)
        if peer == "p9":
            raise ConnectionError("down")
        return rtts[peer] + (1.0 if calls.count(peer) == 1 else 0.0)  # the first one opens the connection: slow

    hops = NextHops(probe, clock, random.Random(1))
    spans = [ME, *(record(peer, 15, 30) for peer in rtts)]
    assert await hops.measure(spans, ME) == 10 - latency.PROBES_PER_ROUND  # still never probed: the next round soon
    # a new peer: one probe to connect, one measured (p9, down, answers neither)
    assert len(calls) == 2 * latency.PROBES_PER_ROUND - ("p9" in calls)
    clock.now += 1
    await hops.measure(spans, ME)
    # 8 never-probed peers first, each probed twice (p9, down, once)
    assert len(set(calls)) == 8 and all(calls.count(peer) == (1 if peer == "p9" else 2) for peer in calls)
    for _ in range(2):
        clock.now += 1
        await hops.measure(spans, ME)
    assert sorted(set(calls)) == sorted(rtts)
    assert hops.announced() == tuple((f"p{i}", round(0.01 * (i + 1), 4)) for i in range(MAX_NEXT_RTT))
    rtts["p0"] = 0.5  # a slow answer later: the lowest of the last few counts, so p0 stays first
    for _ in range(3):
        clock.now += 1
        await hops.measure(spans, ME)
    assert hops.announced()[0] == ("p0", 0.01)
    clock.now += latency.FRESH_FOR + 1  # nothing measured since: nothing announced
    assert hops.announced() == ()


async def test_a_peer_that_no_longer_follows_is_forgotten(monkeypatch):
    monkeypatch.setattr(latency, "PROBES_PER_ROUND", 100)

    async def probe(peer):
        return 0.02

    hops = NextHops(probe, Clock())
    await hops.measure([ME, *(record(f"p{i}", 15, 30) for i in range(8))], ME)
    assert len(hops.announced()) == MAX_NEXT_RTT
    await hops.measure([ME, dataclasses.replace(record("p0", 15, 30), start=20)], ME)  # p0 moved past a gap
    assert hops.announced() == () and not hops._probed


async def test_among_many_candidates_it_follows_a_bounded_few_and_swaps_the_slowest_for_new_ones(monkeypatch):
    """More candidates than MAX_KNOWN (a large swarm): it follows MAX_KNOWN, reports none pending once each was
    probed (so its rounds slow down), then swaps its slowest for a waiting one each round, keeping the best."""
    monkeypatch.setattr(latency, "MAX_KNOWN", 6)
    rtts = {f"p{i:02d}": 0.001 * (i + 1) for i in range(20)}
    calls = []

    async def probe(peer):
        calls.append(peer)
        return rtts[peer]

    hops, clock = NextHops(probe, Clock(), random.Random(0)), Clock()
    hops.clock = clock
    spans = [ME, *(record(peer, 15, 30) for peer in rtts)]
    assert await hops.measure(spans, ME) == 6 - latency.PROBES_PER_ROUND
    clock.now += 1
    assert await hops.measure(spans, ME) == 0 and len(hops._probed) == 6
    for _ in range(200):
        clock.now += 1
        await hops.measure(spans, ME)
        assert len(hops._probed) <= 6
    best = tuple((f"p{i:02d}", round(0.001 * (i + 1), 4)) for i in range(MAX_NEXT_RTT))
    assert hops.announced() == best  # every candidate got its turn; the fastest stayed
    assert all(calls.count(peer) >= 2 for peer in rtts)


async def test_a_probe_that_hangs_costs_the_round_its_timeout_and_counts_nothing(monkeypatch):
    monkeypatch.setattr(latency, "PROBE_TIMEOUT", 0.05)

    async def probe(peer):
        if peer == "silent":
            await asyncio.sleep(10)
        return 0.01

    hops = NextHops(probe, Clock())
    began = asyncio.get_running_loop().time()
    await hops.measure([ME, record("silent", 15, 30), record("quick", 15, 30)], ME)
    assert asyncio.get_running_loop().time() - began == pytest.approx(0.05, abs=0.5)
    assert hops.announced() == (("quick", 0.01),)
