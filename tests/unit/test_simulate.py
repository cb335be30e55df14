"""The swarm simulator (benchmarks/sim): it drives the shipped placement and routing, is reproducible, and its
baseline's route search agrees with the exact one."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from benchmarks.sim import bound, engine, policies
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
    for peer in sim.peers.values():  # every live session's KV is held exactly where it runs, as its cache grows
        assert set(peer.held) == peer.sessions and peer.reserved == sum(peer.held.values())
        for sid, tokens in peer.held.items():
            session = sim.sessions[sid]
            assert tokens % 128 == 0 or tokens == session.max_length
            assert session.context <= tokens + 128 and tokens <= session.max_length
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


def test_petals_holds_a_sessions_whole_max_length_and_ours_what_its_cache_grows_to():
    """Petals' handler allocates max_length (prompt + max_new_tokens) when a session opens; ours reserve the cache's
    128-token growth chunks as it grows (swarm.server.backend). Both route by room for the whole max_length."""
    assert Petals().kv_tokens(300, 812) == 812
    assert [Ours().kv_tokens(c, 812) for c in (1, 128, 129, 300, 800)] == [128, 128, 256, 384, 812]
    sim, _ = small_run(Petals(), duration=300)
    assert any(peer.held for peer in sim.peers.values())
    for peer in sim.peers.values():
        assert all(tokens == sim.sessions[sid].max_length for sid, tokens in peer.held.items())


def test_a_session_whose_peer_cannot_grow_its_kv_waits_then_that_link_is_replaced():
    """Ours: a peer without the budget for a session's next chunk makes it wait (no tokens) up to the admission
    wait; then it refuses, the session leaves that peer (its KV freed), avoids it and routes a replacement link."""
    sim, _ = small_run(Ours(), duration=300)
    session = next(s for s in sim.sessions.values() if s.links and not s.broken
                   and s.req.prompt + s.req.output > sim.peers[s.links[0][0]].held[s.sid] + 1)
    pid = session.links[0][0]
    peer = sim.peers[pid]
    session.generated = float(peer.held[session.sid] + 1 - session.req.prompt)  # one token past its chunk
    peer.spec = dataclasses.replace(peer.spec, kv_budget_tokens=peer.reserved)  # full: the next chunk cannot fit
    before = session.generated
    sim._decode(session, False)
    assert session.generated == before and session.kv_wait_since == sim.now and not session.broken
    sim.now += engine.ADMISSION_WAIT_S
    sim._decode(session, False)
    assert session.generated == before and session.broken == [i for i, ln in enumerate(session.links) if ln[0] == pid]
    assert session.sid not in peer.sessions and session.sid not in peer.held
    assert peer.reserved == sum(peer.held.values()) and sim.avoid[session.user][pid] > sim.now
    assert sim.stats["refused_kv_growth"] == 1


def test_petals_servers_step_sessions_one_at_a_time_and_ours_batch_them():
    """A peer's work for a token of each of its n sessions, per block: ours one batched forward (1/true + (n − 1) ×
    marginal), Petals' task pool one session after another (n / true); a token takes the longer of its chain alone
    and its busiest link's work. `Petals(batches_sessions=True)` compares the policies alone."""
    world = make_world(5, 60.0, seed=2)
    peer = engine.Peer(world.peers[0], sessions={1, 2, 3, 4})
    single, marginal = 1 / peer.spec.true, peer.spec.marginal_s()
    assert 0 < marginal < single
    assert peer.step_s(True) == pytest.approx(single + 3 * marginal)
    assert peer.step_s(False) == pytest.approx(4 * single)
    peer.sessions = set(range(engine.MAX_BATCH_SESSIONS + 6))  # more than one forward takes: two forwards
    assert peer.step_s(True) == pytest.approx(2 * single + (engine.MAX_BATCH_SESSIONS + 4) * marginal)
    assert Ours().batches_sessions and not Petals().batches_sessions and Petals(True).batches_sessions
    sim = Simulation(make_world(30, 300, seed=3), Petals(), 300, 120)
    sim.run()
    session = next(s for s in sim.sessions.values() if s.links and not s.broken and s.req.output - s.generated > 20)
    sim.peers[session.links[0][0]].sessions.update(range(-40, 0))  # 40 more sessions on its first peer
    tokens = {}
    for batches in (False, True):
        sim.policy = Petals(batches_sessions=batches)
        before = session.generated
        session.last_progress = session.ready_at = sim.now
        sim.now += 1.0
        sim._decode(session, False)
        tokens[batches] = session.generated - before
        network = sim._network_s(session, session.links)
        work = [(e - s) * sim.peers[pid].step_s(batches) for pid, s, e in session.links]
        alone = sum((e - s) / sim.peers[pid].spec.true for pid, s, e in session.links)
        assert tokens[batches] == pytest.approx(1 / max(network + alone, max(work)))  # the busiest link's bound
        sim.saturated = True
        assert sim._token_s(session) == pytest.approx(network + sum(work))  # everyone waits for everyone
        sim.saturated = False
    assert tokens[False] < tokens[True] * 0.8


@pytest.mark.parametrize("push", [True, False])
def test_no_policy_serves_more_than_the_bound_and_no_request_is_ahead_of_its_floor(push):
    """benchmarks.sim.bound: every request at its user's floor (network legs and compute at the world's best, on the
    engine's ticks) is what no placement or routing can beat. In each policy's run every request is sent no earlier
    than at the floor, starts decoding (its whole chain routed and its prompt prefilled) no earlier and is seen
    ending no earlier; the run serves at most the bound's tokens, and every chain it holds takes at least its user's
    floor a token."""
    world = make_world(30, 300, seed=4)
    floor, floors = bound.bound(world, 300.0, 100.0, push, tick_s=engine.TICK_S), bound.floors(world, push)
    assert floor["tokens_all"] < bound.bound(world, 300.0, 100.0, push)["tokens_all"]  # the engine's ticks cost
    at_floor = {(user, number): times for user, number, *times in bound.floor_requests(world, 300.0, push,
                                                                                        engine.TICK_S)}
    for policy in (Ours(), Petals(), Petals(batches_sessions=True)):
        sim = Simulation(world, policy, 300.0, 100.0, push=push)
        began, ended = {}, {}
        repair, finish = sim._repair, sim._finish

        def routed(session, repair=repair, began=began):
            whole = session.broken == [-1]
            repair(session)
            if whole and not session.broken:
                began[session.user, session.number] = (session.began, session.ready_at)

        def finished(session, finish=finish, ended=ended, sim=sim):
            ended[session.user, session.number] = sim.now
            finish(session)

        sim._repair, sim._finish = routed, finished
        result = sim.run()
        assert 0 < result["tokens_all"] <= floor["tokens_all"]
        assert len(ended) > 50
        for key, end in ended.items():
            sent, first, done, _ = at_floor[key]
            assert began[key][0] >= sent - 1e-9 and began[key][1] >= first - 1e-9, key
            assert end >= bound._tick(done, engine.TICK_S) - 1e-9, key
        held = [s for s in sim.sessions.values() if s.links and not s.broken]
        assert held, "no session holds a chain at the end of the run"
        for session in held:
            assert sim._network_s(session, session.links) >= floors["network_s"][session.user] - 1e-12
            assert sim._token_s(session) >= floors["token_s"][session.user] - 1e-12
