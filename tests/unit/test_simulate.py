"""The swarm simulator (benchmarks/sim): it drives the shipped placement and routing, is reproducible, and its
baseline's route search agrees with the exact one."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from benchmarks.sim import engine, policies
from benchmarks.sim.engine import Simulation
from benchmarks.sim.policies import Ours, Petals, dijkstra_chain
from benchmarks.sim.world import NUM_BLOCKS, make_world, rtt_s
from swarm.client import routing
from swarm.client.routing import Link, PeerView, chain_seconds, find_chain
from swarm.server import placement


def small_run(policy, seed: int = 3, peers: int = 30, duration: float = 420.0) -> tuple[Simulation, dict]:
    sim = Simulation(make_world(peers, duration, seed=seed), policy, duration, 120.0)
    return sim, sim.run()


def test_ours_is_the_shipped_code():
    assert policies.placement is placement and policies.find_chain is routing.find_chain


def test_a_run_serves_tokens_and_keeps_its_books(monkeypatch):
    calls = {"choose_span": 0, "find_chain": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(placement, "choose_span", counted("choose_span", placement.choose_span))
    monkeypatch.setattr(policies, "find_chain", counted("find_chain", policies.find_chain))
    sim, result = small_run(Ours())
    assert calls["choose_span"] >= 30 and calls["find_chain"] >= result["requests_measured"] > 50
    assert result["throughput_tok_s"] > 0 and 0 < result["p50_latency_s"] <= result["p90_latency_s"]
    assert result["departures"] >= 1 and result["dht_peer_write_bytes_s"] > 0
    for peer in sim.peers.values():  # every live session's KV is held exactly where it runs
        held = sum(sim.sessions[sid].length for sid in peer.sessions)
        assert peer.reserved == held
        assert all(any(link[0] == peer.spec.peer_id for link in sim.sessions[sid].links) for sid in peer.sessions)
    online = [p for p in sim.peers.values() if p.state == "online"]
    for block in range(NUM_BLOCKS):
        assert sim.coverage[block] == sum(p.start <= block < p.end for p in online)


def test_the_same_seed_gives_the_same_run():
    def strip(result):
        return {k: v for k, v in result.items() if not k.startswith(("route_ms", "sim_wall"))}

    assert strip(small_run(Petals(), seed=5, duration=300)[1]) == strip(small_run(Petals(), seed=5, duration=300)[1])


def test_a_crashed_peer_stays_routable_until_its_record_expires():
    sim = Simulation(make_world(20, 200, seed=1), Ours(), 200, 0)
    sim.duration = 100.0
    sim.run()
    victim = max(sim.peers.values(), key=lambda p: len(p.sessions))
    assert victim.sessions, "no peer carries a session at this point of the run"
    riders = [sim.sessions[sid] for sid in victim.sessions]
    sim._on_leave((victim.spec.peer_id, True))
    assert victim.spec.peer_id in sim.dht and sim._crashed(victim.spec.peer_id)
    assert sim.stats["crashes"] == 1 and not victim.sessions
    for session in riders:  # each waits the crash detection time, then replaces the link through the victim
        assert session.broken and session.ready_at >= sim.now + engine.DETECT_CRASH_S - 1e-9
        assert all(session.links[i][0] == victim.spec.peer_id for i in session.broken)
    sim.now += Ours.ttl_s + 1
    sim._placement_view = (-1.0, [])
    assert victim.spec.peer_id not in {r.peer_id for r in sim._placement_read()}


@pytest.mark.parametrize("seed", range(4))
def test_petals_dijkstra_finds_a_chain_as_cheap_as_the_exact_search(seed):
    """The baseline's routes come from find_chain over load-free records; its own Dijkstra (timed for route cost)
    must reach the same cost on the same records."""
    rng = random.Random(seed)
    world = make_world(60, 0, seed=seed)
    sim = Simulation(world, Petals(), 0, 0)
    records = []
    for i, spec in enumerate(world.peers):
        start = (0, NUM_BLOCKS - spec.length)[i] if i < 2 else rng.randrange(0, NUM_BLOCKS - 5)
        peer = engine.Peer(spec, state="online", start=start, end=min(NUM_BLOCKS, start + spec.length))
        records.append(sim._record(peer))
    user = world.users[0]
    views = {r.peer_id: PeerView(rtt=rtt_s(user, s.host)) for r, s in zip(records, world.peers, strict=True)}
    exact = find_chain(records, "m", NUM_BLOCKS, views=views, length=500)
    by_id = {r.peer_id: r for r in records}
    graph = [Link(by_id[p], s, e) for p, s, e in dijkstra_chain(records, views, NUM_BLOCKS, 500)]
    assert graph[0].start == 0 and graph[-1].end == NUM_BLOCKS
    assert chain_seconds(graph, views) == pytest.approx(chain_seconds(exact, views), rel=1e-9)


def test_petals_block_selection_takes_the_weakest_window_and_moves_only_for_a_quarter_more():
    peer = dataclasses.replace(find_chain.__globals__["SpanInfo"](
        peer_id="me", model_id="m", start=0, end=10, num_blocks=30, hidden_size=8, dtype="float16", quant="nf4",
        max_length=64, kv_budget_tokens=100, free_kv_tokens=100, active_sessions=0, throughput=100.0), movable=True)
    other = dataclasses.replace(peer, peer_id="a", start=0, end=20)
    tail = dataclasses.replace(peer, peer_id="b", start=10, end=30)
    assert Petals().join([other, tail], "me", 10, 30) == (0, 10)  # 0:10 has one server, 10:20 two
    assert Petals().move([peer, other, tail], peer) is None  # already where it helps most
    strong = dataclasses.replace(peer, peer_id="c", start=0, end=10, throughput=300.0)
    back = dataclasses.replace(peer, peer_id="d", start=20, end=30)
    # 0:10 at 400 (me + c), 10:20 at 100, 20:30 at 200: moving to 10:20 lifts the minimum 100 → 200 (ratio 0.5)
    assert Petals().move([peer, strong, tail, back], peer) == (10, 20)
    # with 20:30 at 120 instead, the minimum would only reach 120 (ratio 0.83 > 0.75): it stays
    assert Petals().move([peer, strong, tail, dataclasses.replace(back, throughput=20.0)], peer) is None


def test_push_runs_announce_measured_hops_and_cost_the_pushed_legs():
    """With push (both real systems' default) a peer measures round trips to online peers serving its end block and
    announces them (ours: the nearest of those probed, in order); a token costs half of each leg's round trip (client
    → first peer → … → last → client) instead of a client round trip per link; the same seed gives the same run."""
    world = make_world(30, 420.0, seed=3)
    sim = Simulation(world, Ours(), 420.0, 120.0, push=True)
    result = sim.run()
    relayed = Simulation(make_world(30, 420.0, seed=3), Ours(), 420.0, 120.0).run()
    assert result["throughput_tok_s"] > 0 and result["p50_latency_s"] < relayed["p50_latency_s"]
    assert all(info.push for info, _ in sim.dht.values()) and any(info.next_rtt for info, _ in sim.dht.values())
    measured = 0
    for peer in sim.peers.values():
        sim.hops.pop(peer.spec.peer_id, None)
        sim._renew_hops(peer)  # measured now: against the peers online now
        hops = sim._next_rtt(peer)
        measured += bool(hops)
        assert [rtt for _, rtt in hops] == sorted(rtt for _, rtt in hops) and len(hops) <= 4
        for peer_id, rtt in hops:
            follower = sim.peers[peer_id]
            assert follower.state == "online" and follower.start <= peer.end < follower.end
            assert rtt == pytest.approx(rtt_s(sim.hosts[peer.spec.peer_id], sim.hosts[peer_id]))
    assert measured >= 10
    session = next(s for s in sim.sessions.values() if len(s.links) >= 2 and not s.broken)
    ids = [link[0] for link in session.links]
    legs = [rtt_s(world.users[session.user], sim.hosts[ids[0]]), rtt_s(world.users[session.user], sim.hosts[ids[-1]])]
    legs += [rtt_s(sim.hosts[a], sim.hosts[b]) for a, b in itertools.pairwise(ids) if a != b]
    assert sim._network_s(session, session.links) == pytest.approx(sum(legs) / 2)
    again = Simulation(make_world(30, 420.0, seed=3), Ours(), 420.0, 120.0, push=True).run()
    assert {k: v for k, v in again.items() if not k.startswith(("route_ms", "sim_wall"))} == \
        {k: v for k, v in result.items() if not k.startswith(("route_ms", "sim_wall"))}


def test_each_user_routes_by_its_own_clients_last_read():
    """A user's client reads the records when a route needs them and its last read is a period old (as the
    router does): users read at different times, so their views differ in age (not one snapshot that every user
    herds by), none older than a period when it routes, and a read is the records of that moment."""
    sim = Simulation(make_world(30, 300, seed=1), Ours(), 300, 0, push=True)
    sim.run()
    period = sim.policy.client_refresh(len(sim.dht))
    reads = dict(sim._user_views)
    assert len({at for at, _ in reads.values()}) > 1
    user, (at, view) = next(iter(reads.items()))
    assert sim._client_read(user) is view if sim.now - at < period else sim._client_read(user) is not view
    sim.now += period  # a period on, the user's next route reads again: the records as they are now
    sim.dht[sim.world.peers[0].peer_id] = (dataclasses.replace(next(iter(sim.dht.values()))[0], peer_id="fresh"),
                                           sim.now + 100)
    fresh = sim._client_read(user)
    assert fresh is not view and "fresh" in fresh.peer_ids and sim._user_views[user][0] == sim.now
    assert all(sim._client_read(other) is fresh for other in reads if sim.now - reads[other][0] >= period)
