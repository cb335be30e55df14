"""The client's router without a network: bans with backoff, refusals, the client's own sessions in the load, the
observed speed of peers, a stale view refreshed before a route is chosen, and sessions opened through it."""

from __future__ import annotations

import asyncio
import dataclasses
from types import SimpleNamespace

import pytest

from swarm.client import router as router_module
from swarm.client.health import Outcome, PeerHealth
from swarm.client.router import Router
from swarm.client.session import InferenceSession
from swarm.protocol import ErrorCode, NoChainError, PeerError, SpanInfo


def record(peer: str, start: int, end: int) -> SpanInfo:
    return SpanInfo(peer_id=peer, model_id="m", start=start, end=end, num_blocks=30, hidden_size=8, dtype="float32",
                    quant="none", max_length=64, kv_budget_tokens=1000, free_kv_tokens=1000, active_sessions=0,
                    throughput=100.0, batch_throughput=400.0)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def router(monkeypatch, clock):
    router = Router(None, None, "m", 30, clock=clock)
    monkeypatch.setattr(router, "start", lambda: None)  # no background refresh: the view is set by hand
    router.spans = [record("a", 0, 30), record("b", 0, 30)]
    router.updated = clock()
    return router


async def first_peer(router: Router, **kwargs) -> str:
    return (await router.route(**kwargs))[0].peer.peer_id


def test_bans_double_per_episode_up_to_a_cap(clock):
    health = PeerHealth(clock)
    lengths = []
    for _ in range(8):
        health.report("a", Outcome.FAILED)
        health.report("a", Outcome.FAILED)  # while banned: the same episode, not a longer ban
        lengths.append(health.ban_left("a"))
        clock.now += lengths[-1]  # the ban runs out; the next failure starts a new episode
    assert lengths == [15, 30, 60, 120, 240, 480, 600, 600]
    health.report("a", Outcome.FAILED)
    assert health.banned() == {"a"}
    clock.now += 601
    assert health.banned() == set()


def test_a_refusal_is_avoided_briefly_and_is_no_ban(clock):
    health = PeerHealth(clock)
    health.report("a", Outcome.REFUSED)
    assert health.refused() == {"a"} and health.banned() == set()
    clock.now += PeerHealth.REFUSAL_SECONDS + 0.1
    assert health.refused() == set()


async def test_a_banned_peer_is_avoided_but_beats_no_answer_except_as_a_replacement(router):
    assert await first_peer(router) in {"a", "b"}
    router.report("a", Outcome.FAILED)
    assert [link.peer.peer_id for link in await router.route()] == ["b"]
    router.report("b", Outcome.FAILED)  # both banned: for a new session a suspect peer is better than no answer
    assert len(await router.route()) == 1
    with pytest.raises(NoChainError):  # ...but a failed link is never replaced by a peer that failed
        await router.route(0, 30, replacing=True)


async def test_refusing_peers_are_left_out_even_of_new_sessions(router):
    router.report("a", Outcome.REFUSED)
    router.report("b", Outcome.REFUSED)
    with pytest.raises(NoChainError):
        await router.route()


async def test_a_moved_peer_makes_the_router_read_the_swarm_before_the_next_route(router, monkeypatch):
    reads = []

    async def refresh():
        reads.append(1)
        router.spans = [record("b", 0, 30)]
        router.updated = router.clock()
        return router.spans

    monkeypatch.setattr(router, "refresh", refresh)
    await router.route()
    assert not reads
    router.report("a", Outcome.MOVED)
    assert await first_peer(router) == "b" and reads == [1] and router.banned() == set()


async def test_own_sessions_count_as_load_until_the_next_probe(router):
    first = await first_peer(router)
    router.opened([first])
    other = await first_peer(router)
    assert other != first
    router.opened([other])
    router.closed([first])
    assert await first_peer(router) == first  # a closed session no longer counts


async def test_a_stale_view_is_refreshed_before_routing(router, monkeypatch, clock):
    calls = []

    async def refresh():
        calls.append(1)
        router.spans = [record("c", 0, 30)]
        router.updated = clock()
        return router.spans

    monkeypatch.setattr(router, "refresh", refresh)
    assert await first_peer(router) in {"a", "b"} and not calls  # fresh enough: no network
    clock.now += 3 * router.period
    assert await first_peer(router) == "c" and calls == [1]


def fake_swarm(monkeypatch, records, probed, rtt=0.001, gate=None, loads=None):
    async def get_spans(dht, model_id, num_blocks=None):
        return records

    async def probe(p2p, peer_id, timeout):
        probed.append(peer_id)
        if gate is not None:
            await gate()
        fresh = next(r for r in records if r.peer_id == peer_id)
        return dataclasses.replace(fresh, active_sessions=(loads or {}).get(peer_id, 0)), rtt

    monkeypatch.setattr(router_module, "get_spans", get_spans)
    monkeypatch.setattr(router_module, "probe", probe)


async def test_refresh_probes_only_allowed_peers_and_an_allowlist_change_rereads(router, monkeypatch):
    probed: list[str] = []
    fake_swarm(monkeypatch, [record("a", 0, 30), record("b", 0, 30)], probed, loads={"a": 5})
    router.allowed_peers = {"a"}  # the view is stale now: the next route reads the swarm through the filter
    assert [link.peer.peer_id for link in await router.route()] == ["a"] and probed == ["a"]
    assert router.health.rtt("a") == 0.001
    router.allowed_peers = None
    assert await first_peer(router) == "b"  # a's probe said 5 sessions
    assert sorted(probed) == ["a", "a", "b"]


async def test_a_failed_probe_bans_the_peer(router, monkeypatch):
    async def get_spans(dht, model_id, num_blocks=None):
        return [record("a", 0, 30), record("b", 0, 30)]

    async def probe(p2p, peer_id, timeout):
        if peer_id == "a":
            raise TimeoutError
        return record(peer_id, 0, 30), 0.001

    monkeypatch.setattr(router_module, "get_spans", get_spans)
    monkeypatch.setattr(router_module, "probe", probe)
    await router.refresh()
    assert router.banned() == {"a"} and await first_peer(router) == "b"


async def test_a_peer_slower_than_it_announces_is_judged_by_what_it_did(router, clock):
    router.spans = [dataclasses.replace(record("liar", 0, 30), throughput=100000.0, batch_throughput=800000.0),
                    record("honest", 0, 30)]
    assert await first_peer(router) == "liar"
    for _ in range(3):  # its decode steps took 0.3 s over 30 blocks: 10 ms per block, not 0.01 ms
        router.observed("liar", 30, 0.3)
    assert await first_peer(router) == "honest" and router.health.overclaimed() == {"liar"}
    clock.now += 61  # not seen for a minute, but caught overstating 1000x: its observed time still counts
    router.updated = clock()
    assert await first_peer(router) == "honest"
    clock.now += 600  # ten minutes later the claim counts again (and is checked again)
    router.updated = clock()
    assert await first_peer(router) == "liar"


async def test_a_peer_a_little_slower_than_announced_is_judged_by_its_steps_but_not_penalised(router, clock):
    router.spans = [record("a", 0, 30), record("b", 0, 30)]  # both claim 100 tok/s per block: 10 ms per block
    for _ in range(5):
        router.observed("a", 30, 30 * 0.02)  # 20 ms per block: slower than claimed, within the factor of 3
    assert router.health.overclaimed() == set() and await first_peer(router) == "b"
    clock.now += 61  # not seen lately: the announcement counts again, a tie broken by peer id
    router.updated = clock()
    assert await first_peer(router) == "a"


def fake_open(monkeypatch, answer):
    tried: list[str] = []

    async def open_session(p2p, chain, *args, **kwargs):
        peer = chain[0].peer.peer_id
        tried.append(peer)
        error = answer(len(tried), peer)
        if error is not None:
            raise error
        return SimpleNamespace(chain=chain)

    monkeypatch.setattr(InferenceSession, "open", open_session)
    return tried


@pytest.mark.parametrize(("code", "banned"), [("moved", False), ("capacity", False), ("internal", True)])
async def test_a_peer_refusing_a_new_session_is_left_out_of_another_try(router, monkeypatch, code, banned):
    async def refresh():  # a moved peer's record says it is draining
        router.spans = [dataclasses.replace(s, state="draining") if s.peer_id == tried[0] else s
                        for s in router.spans]
        router.updated = router.clock()
        return router.spans

    monkeypatch.setattr(router, "refresh", refresh)
    tried = fake_open(monkeypatch, lambda n, peer: PeerError(f"peer {peer} says no", code, peer) if n == 1 else None)
    session = await InferenceSession.routed(None, router, 32)
    assert len(tried) == 2 and tried[0] != tried[1] and session.chain[0].peer.peer_id == tried[1]
    assert (tried[0] in router.banned()) == banned  # only a failure is banned; a refusal is not
    assert router.health.own_sessions() == {}  # the failed try is not counted as a session


async def test_when_no_one_else_serves_the_blocks_the_refusal_is_the_answer(router, monkeypatch):
    router.spans = [record("only", 0, 30)]
    fake_open(monkeypatch, lambda n, peer: PeerError("KV budget exhausted", ErrorCode.CAPACITY, "only"))
    with pytest.raises(PeerError, match="KV budget exhausted") as info:
        await InferenceSession.routed(None, router, 32)
    assert info.value.code == ErrorCode.CAPACITY  # the gateway turns this into 503 + Retry-After


async def test_a_large_swarm_is_probed_in_turns(router, monkeypatch):
    records = [record(f"p{i:02d}", 0, 30) for i in range(10)]
    probed: list[str] = []
    fake_swarm(monkeypatch, records, probed)
    router.max_probes = 4
    router.opened(["p09"])  # a peer this client has a session through is probed every time
    rounds = []
    for _ in range(3):
        probed.clear()
        await router.refresh()
        rounds.append(set(probed))
    assert all(len(r) == 4 and "p09" in r for r in rounds)
    assert set().union(*rounds) == {r.peer_id for r in records}  # 3 + 3 + 3 others: everyone had a turn
    assert len(router.spans) == 10  # the unprobed keep their DHT records


async def test_an_allowlist_set_during_a_refresh_holds_for_the_next_route(router, monkeypatch):
    """The background refresh may be reading the DHT when the allowlist changes: the view it stores must not bring
    the peers left out back into routes (CI once saw half of a test's sessions routed around its allowlist)."""
    probing, release = asyncio.Event(), asyncio.Event()

    async def gate():
        probing.set()
        await release.wait()

    fake_swarm(monkeypatch, [record("a", 0, 30), record("b", 0, 30), record("c", 0, 30)], [], gate=gate)
    background = asyncio.create_task(router.refresh())  # began before the allowlist
    await probing.wait()
    router.allowed_peers = {"c"}
    route = asyncio.create_task(router.route())  # the view is stale now: waits for the refresh in flight
    await asyncio.sleep(0)
    release.set()
    await background
    assert [link.peer.peer_id for link in await route] == ["c"]
    for _ in range(5):
        assert await first_peer(router) == "c"
    router.allowed_peers = None
    assert {s.peer_id for s in router.spans} == {"a", "b", "c"}


async def test_a_large_swarm_is_read_less_often_but_its_peers_are_probed_every_period(clock, monkeypatch):
    """Re-reading every record at a fixed period costs traffic that grows with the swarm: the background refresh
    reads the DHT every read_period() (at most READ_BUDGET bytes/s of records) and probes in between."""
    from swarm.client import router as router_module
    from swarm.dht import READ_BUDGET, RECORD_BYTES, read_period

    assert read_period(3.0, 10) == 3.0 and read_period(60.0, 1000) == 60.0
    assert read_period(3.0, 1000) == pytest.approx(1000 * RECORD_BYTES / READ_BUDGET)
    assert read_period(3.0, 10**6) == read_period(3.0, 4096)  # a read parses at most MAX_RECORDS
    swarm = [record(f"p{i:04d}", 0, 30) for i in range(2000)]
    reads, probes = [], []

    async def get_spans(dht, model_id, num_blocks=None):
        reads.append(clock())
        return swarm

    async def probe(p2p, peer_id, timeout):
        probes.append(peer_id)
        return next(s for s in swarm if s.peer_id == peer_id), 0.01

    monkeypatch.setattr(router_module, "get_spans", get_spans)
    monkeypatch.setattr(router_module, "probe", probe)
    sleeps = []

    async def sleep(seconds):
        sleeps.append(seconds)
        clock.now += seconds
        if len(sleeps) >= 40:
            raise asyncio.CancelledError

    router = Router(None, None, "m", 30, clock=clock, period=3.0, max_probes=8)
    monkeypatch.setattr(router_module.asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        await router._loop()
    assert router.dht_interval == read_period(3.0, 2000) > 90
    assert set(sleeps) == {3.0} and reads == [1000.0, 1099.0]  # 40 refreshes, t = 0..117 s; reads 97.7 s apart
    assert len(probes) == 40 * 8
    assert not router.stale


async def test_a_failed_link_is_replaced_from_the_last_records_probed_again_without_probing_the_banned(
        router, monkeypatch):
    """Replacing a link: the records of the last read, probed again now (not the failed, banned peer: a cut link
    would hold the probe round up for its whole timeout), and no DHT read unless they give no chain."""
    reads, probed = [], []

    async def get_spans(dht, model_id, num_blocks):
        reads.append(model_id)
        return [record("a", 0, 30), record("b", 0, 30), record("c", 0, 30)]

    async def probe(p2p, peer_id, timeout):
        probed.append(peer_id)
        return record(peer_id, 0, 30), 0.01

    monkeypatch.setattr(router_module, "get_spans", get_spans)
    monkeypatch.setattr(router_module, "probe", probe)
    router._read, router._read_at = [record("a", 0, 30), record("b", 0, 30)], router.clock()
    router.report("a", Outcome.FAILED)
    assert await first_peer(router, fresh=True, replacing=True) == "b"
    assert reads == [] and probed == ["b"]
    router.report("b", Outcome.FAILED)  # the last records give no chain now: the DHT is read, "c" found
    probed.clear()
    assert await first_peer(router, fresh=True, replacing=True) == "c"
    assert reads == ["m"] and probed == ["c"]
    assert await first_peer(router, fresh=True) == "c" and reads == ["m", "m"]  # a new session's route reads it


def test_health_gives_every_spans_view_at_once_as_it_gives_each(clock):
    """`view_columns` (what a route search over thousands of peers reads) agrees with `view` peer by peer: RTTs,
    own sessions less those the records count, observed speed (expiring, doubled for an overclaimer), unknown peers,
    a peer seen twice in the records, and peers first seen after the table's slots were looked up."""
    import math
    import random

    from swarm.client.routing import SpanTable

    rng, health = random.Random(3), PeerHealth(clock)
    ids = [f"p{i}" for i in range(40)]
    table = SpanTable([record(p, 0, 30) for p in [*ids, "p3", "never"]])

    def agree():
        rtt, extra, observed = health.view_columns(table)
        for row, peer_id in enumerate(table.peer_ids):
            view = health.view(peer_id)
            assert (math.isnan(rtt[row]) if view.rtt is None else rtt[row] == view.rtt), peer_id
            assert extra[row] == view.extra_sessions, peer_id
            seen = view.observed_block_seconds
            assert (math.isnan(observed[row]) if seen is None else observed[row] == pytest.approx(seen)), peer_id

    agree()  # nobody known yet
    for round_ in range(6):
        for peer_id in rng.sample(ids[: 10 + 5 * round_], 8):  # more peers become known each round
            match rng.randrange(5):
                case 0:
                    health.rtt_sample(peer_id, rng.uniform(0.001, 0.2))
                case 1:
                    health.opened([peer_id])
                case 2:
                    health.closed([peer_id])
                case 3:  # far slower than claimed: overclaims after a few samples
                    for _ in range(4):
                        health.step_sample(peer_id, 3, rng.uniform(0.1, 0.3), claimed=0.001)
                case _:
                    health.step_sample(peer_id, 2, rng.uniform(0.001, 0.05))
        health.records_read(ids[::2], health.own_sessions())
        agree()
        clock.now += rng.choice((1.0, 70.0))  # some observations run out (OBSERVATION_TTL 60 s)
        agree()


def test_the_router_builds_its_table_once_per_view(router):
    table = router.table
    assert router.table is table and [s.peer_id for s in table.spans] == ["a", "b"]
    router.spans = [record("c", 0, 30)]  # a refresh
    assert router.table is not table and router.table.peer_ids == ["c"]
    table = router.table
    router.allowed_peers = {"x"}
    assert router.table is not table and router.table.peer_ids == []
    router.allowed_peers.add("c")  # changed in place: the next route sees it
    assert router.table.peer_ids == ["c"]


async def test_routes_count_measured_hops_only_for_sessions_that_push(router):
    """The router's sessions push (router.push): its routes count the hops peers measured; a session that stopped
    pushing (a replacement route with push=False) is routed by this client's round trips alone."""
    near = dataclasses.replace(record("near", 0, 15), push=True, next_rtt=(("b", 0.100),))
    far = dataclasses.replace(record("far", 0, 15), push=True, next_rtt=(("b", 0.002),))
    router.spans = [near, far, dataclasses.replace(record("b", 15, 30), push=True)]
    for peer, rtt in (("near", 0.010), ("far", 0.030), ("b", 0.030)):
        router.health.rtt_sample(peer, rtt)
    router.push = True
    assert await first_peer(router) == "far"
    assert await first_peer(router, push=False) == "near"
    router.push = False
    assert await first_peer(router) == "near"


async def test_a_span_with_no_other_replica_is_not_searched_again_for_a_verifier_until_the_next_refresh(
        router, monkeypatch, clock):
    # every step of a peer that never passed a check is due for one; with no other replica it never can pass, and
    # searching the swarm again at every step of every session cost the gateway's event loop (see verifier_route)
    router.spans = [record("a", 0, 30)]
    router.updated = clock()
    searches = []
    real = router_module.find_chain
    monkeypatch.setattr(router_module, "find_chain", lambda *a, **k: searches.append(1) or real(*a, **k))
    assert await router.verifier_route(0, 30, length=8, batch=1, without=["a"]) is None
    first = len(searches)  # the route, and whether the swarm itself holds none
    for _ in range(5):
        assert await router.verifier_route(0, 30, length=8, batch=1, without=["a"]) is None
    assert first and len(searches) == first
    assert [link.peer.peer_id for link in await router.verifier_route(0, 30, length=8, batch=1, without=["b"])] == ["a"]
    router.spans = [record("a", 0, 30), record("b", 0, 30)]  # the next refresh: a second replica
    router.updated = clock()
    chain = await router.verifier_route(0, 30, length=8, batch=1, without=["a"])
    assert [link.peer.peer_id for link in chain] == ["b"]


async def test_replicas_left_out_for_a_while_are_asked_again_at_the_next_check(router, monkeypatch, clock):
    # a replica refused lately (or banned) gives no verifier now, but it serves the blocks: not remembered as none
    router.report("b", Outcome.REFUSED)
    assert await router.verifier_route(0, 30, length=8, batch=1, without=["a"]) is None
    clock.now += PeerHealth.REFUSAL_SECONDS + 0.1
    router.updated = clock()  # the same refresh
    chain = await router.verifier_route(0, 30, length=8, batch=1, without=["a"])
    assert [link.peer.peer_id for link in chain] == ["b"]
