"""The C search of pushed chains (swarm_kernels.route_search) against the numpy search it stands in for
(swarm.client.routing `_hop_links`): the same chain and the same cost bits, ties included, and the router's use of it
over a large swarm without pruning."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time

import numpy as np
import pytest

from swarm.client import routing
from swarm.client.routing import Hops, PeerView, chain_seconds, find_chain
from swarm.protocol import NoChainError, SpanInfo
from swarm_kernels import route_search
from tests.unit.test_routing import random_swarm

pytestmark = pytest.mark.skipif(not route_search.available(),
                                reason="no C compiler here: the C route search cannot be built (numpy searches)")


def random_hops(rng: random.Random, spans: int, blocks: int, coarse: bool) -> tuple[np.ndarray, np.ndarray, Hops]:
    """Spans over random block ranges (some empty or outside the searched range) and random hops, their costs on a
    grid of 1/1024 (sums exact) or, `coarse`, of a few eighths (most chains then tie with others: the choice among
    equals is tested too)."""
    starts = np.array([rng.randrange(0, blocks) for _ in range(spans)], dtype=np.int64)
    ends = np.array([min(blocks, s + rng.randrange(0, blocks // 2 + 2)) for s in starts], dtype=np.int64)
    grid = (lambda: rng.randrange(1, 3) / 8) if coarse else (lambda: rng.randrange(1, 40) / 1024)
    fixed, per_block = (np.array([grid() for _ in range(spans)]) for _ in range(2))
    count = rng.randrange(0, 3 * spans + 1)
    source = np.array([rng.randrange(spans) for _ in range(count)], dtype=np.int64)
    target = np.array([rng.randrange(spans) for _ in range(count)], dtype=np.int64)
    saving = np.array([grid() for _ in range(count)], dtype=np.float64)
    keep = source != target
    return starts, ends, Hops(fixed, per_block / 8, source[keep], target[keep], saving[keep])


@pytest.mark.parametrize("seed", range(6))
def test_the_c_search_finds_the_numpy_searchs_chain_and_cost(seed):
    rng = random.Random(seed)
    found = 0
    for _ in range(400 if seed % 2 else 60):  # (a wrong choice among equals shows in ~1% of the coarse cases)
        blocks = rng.randrange(2, 40)
        starts, ends, hops = random_hops(rng, rng.randrange(1, 120), blocks, coarse=seed % 2 == 1)
        start = 0 if seed % 2 else rng.randrange(0, blocks)  # (long chains tie more often)
        end = blocks if seed % 2 else rng.randrange(start + 1, blocks + 1)
        numpy_chain = routing._hop_links(starts, ends, start, end, hops)
        c_chain = routing._hop_links(starts, ends, start, end, hops, native=True)
        assert c_chain == numpy_chain  # (the same links, and the cost to the bit)
        if c_chain is not None:
            found += 1
            links = c_chain[0]
            assert links[0][1] == start and links[-1][2] == end
            assert all(a[2] == b[1] for a, b in itertools.pairwise(links))
    assert found > 20


@pytest.mark.parametrize("first_cost", (1e3, 1e5, 1e6))
@pytest.mark.parametrize("gap", (2.5e-12, 4e-12, 5e-11))
def test_twins_that_tie_after_rounding_are_chosen_as_numpy_chooses(first_cost, gap):
    """Two spans over the same blocks, one cheaper by a hair: after an expensive first link their arrivals round to
    the same value, so numpy takes the first of them; the C search must not have left it out as beaten (its margin
    grows with the sums it computes)."""
    none = np.zeros(0, dtype=np.int64)
    hops = Hops(np.array([first_cost, 0.25, 0.25 - gap]), np.zeros(3), none, none, np.zeros(0))
    starts, ends = np.array([0, 1, 1]), np.array([1, 2, 2])
    assert routing._hop_links(starts, ends, 0, 2, hops, native=True) == routing._hop_links(starts, ends, 0, 2, hops)
    far = 10**9  # (positions this large: x * per-block products dwarf the costs' differences)
    hops = Hops(np.array([1.0, 1.0 - 1e-9]), np.array([5.8103263343, 5.8103263344]), none, none, np.zeros(0))
    starts, ends = np.array([far, far]), np.array([far + 1, far + 1])
    assert routing._hop_links(starts, ends, far, far + 1, hops, native=True) == \
        routing._hop_links(starts, ends, far, far + 1, hops)


def test_bad_inputs_are_left_to_numpy():
    one = (np.array([0]), np.array([2]), 0, 2, np.array([0.1]), np.array([0.01]), np.zeros(0, np.int64),
           np.zeros(0, np.int64), np.zeros(0))
    assert route_search.pushed_chain(*one) == (((0, 0, 2),), 0.1 + 2 * 0.01)
    assert route_search.pushed_chain(np.array([0]), np.array([2]), 0, 3, *one[4:]) == route_search.NO_CHAIN
    assert route_search.pushed_chain(np.array([-1]), *one[1:]) is None
    assert route_search.pushed_chain(np.array([0]), np.array([1 << 40]), *one[2:]) is None
    assert route_search.pushed_chain(*one[:2], 2, 2, *one[4:]) is None  # (an empty range)
    assert route_search.pushed_chain(*one[:4], np.array([np.nan]), *one[5:]) is None
    assert route_search.pushed_chain(*one[:4], np.array([1e300]), *one[5:]) is None  # (sums could overflow)
    assert route_search.bound(*one[:5], np.array([np.inf]), np.array([0.0])) is None
    assert route_search.pushed_chain(*one[:6], np.array([0]), np.array([1]), np.array([0.1])) is None  # no span 1


def swarm_with_hops(rng: random.Random, size: int, push_share: float = 1.0) -> list[SpanInfo]:
    """`random_swarm`, a share of it taking pushes, each naming up to 4 measured hops to peers that may follow it."""
    spans = [dataclasses.replace(s, push=rng.random() < push_share) for s in random_swarm(rng, size)]
    out = []
    for info in spans:
        after = [s.peer_id for s in spans if s.start <= info.end < s.end and s.peer_id != info.peer_id]
        hops = tuple((peer, rng.uniform(0.0, 0.01)) for peer in rng.sample(after, min(4, len(after))))
        out.append(dataclasses.replace(info, next_rtt=hops))
    return out


@pytest.mark.parametrize("push_share", (1.0, 0.7))
@pytest.mark.parametrize("seed", range(3))
def test_a_large_swarm_is_routed_over_every_span_in_c(seed, push_share, monkeypatch):
    """Over PRUNE_ABOVE peers a pushed route is the C search over every span: the chain the numpy search over every
    span finds (no pruning), and as cheap as the pruned numpy search's; where some peers take no pushes, the best
    relayed chain competes as before."""
    rng = random.Random(seed)
    spans = swarm_with_hops(rng, (300, 1000, 2000)[seed], push_share)
    views = {s.peer_id: PeerView(rtt=rng.uniform(0.001, 0.2)) for s in spans}
    table = routing.SpanTable(spans)
    searched = []
    real = routing._hop_links
    monkeypatch.setattr(routing, "_hop_links", lambda *a, **k: searched.append(k.get("native")) or real(*a, **k))
    monkeypatch.setattr(routing, "_native_ready", lambda: True)
    for start, end in ((0, 80), (10, 47)):
        searched.clear()
        c_chain = find_chain(table, "m", 80, (), start, end, views, push=True)
        assert searched == [True]  # (one search, in C, over every span)
        monkeypatch.setattr(routing, "_native_ready", lambda: False)
        pruned = find_chain(table, "m", 80, (), start, end, views, push=True)
        monkeypatch.setattr(routing, "PRUNE_ABOVE", 10**9)
        unpruned = find_chain(spans, "m", 80, (), start, end, views, push=True)
        monkeypatch.setattr(routing, "PRUNE_ABOVE", 48)
        monkeypatch.setattr(routing, "_native_ready", lambda: True)
        cost = chain_seconds(c_chain, views, push=all(link.peer.push for link in c_chain))
        assert cost == pytest.approx(chain_seconds(pruned, views, push=all(x.peer.push for x in pruned)), rel=1e-9)
        if push_share == 1.0:
            assert [(x.peer.peer_id, x.start, x.end) for x in c_chain] == \
                [(x.peer.peer_id, x.start, x.end) for x in unpruned]
        assert c_chain[0].start == start and c_chain[-1].end == end


def test_a_hole_is_named_after_the_c_search(monkeypatch):
    monkeypatch.setattr(routing, "_native_ready", lambda: True)
    spans = [s for s in swarm_with_hops(random.Random(5), 400) if not s.start <= 30 < s.end]
    with pytest.raises(NoChainError) as error:
        find_chain(spans, "m", 80, push=True)
    assert any(a <= 30 < b for a, b in error.value.missing)


def test_ready_builds_in_the_background_and_then_says_so(monkeypatch):
    """The router asks `ready` on its event loop: the first ask does not wait for the compiler."""
    monkeypatch.setattr(route_search, "_build", None)
    route_search._library.cache_clear()
    try:
        assert route_search.ready() is False  # (a build started; numpy meanwhile)
        deadline = time.monotonic() + 60
        while not route_search.ready():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        route_search._library()  # (loaded again for the other tests, from the cache)


@pytest.mark.parametrize("seed", range(6))
def test_the_c_pruning_pass_gives_the_numpy_passs_values(seed):
    """The relayed search's pruning pass (`_bound`: dominance, then least costs back and forth) in C: every span's
    cheapest chain through it and the best chain's cost, the same float64 values; coarse speeds and round trips in
    odd seeds (twins over the same blocks: which of equals stays is tested too)."""
    rng = random.Random(seed)
    coarse = seed % 2 == 1
    for _ in range(25):
        spans = random_swarm(rng, rng.randrange(1, 300))
        if coarse:
            spans = [dataclasses.replace(s, throughput=rng.choice((100.0, 200.0)), batch_throughput=800.0,
                                         active_sessions=rng.randrange(0, 2)) for s in spans]
        views = {s.peer_id: PeerView(rtt=rng.choice((0.01, 0.02)) if coarse else rng.uniform(0.001, 0.2))
                 for s in spans}
        table = routing.SpanTable(spans)
        rows = np.arange(len(table))
        fixed, per_block, _ = table.costs(rows, views, 500)
        start = rng.randrange(0, 80)
        end = rng.randrange(start + 1, 81)
        _, best, through = routing.bound(table, rows, start, end, fixed, per_block)
        c_through, c_best = route_search.bound(table.start, table.end, start, end, fixed, per_block,
                                               table.free_kv_tokens)
        assert c_best == best or not (np.isfinite(c_best) or np.isfinite(best))
        if np.isfinite(best):
            np.testing.assert_array_equal(c_through, through)


@pytest.mark.parametrize("seed", range(3))
def test_a_large_swarms_relayed_route_prunes_in_c_to_the_same_chain(seed, monkeypatch):
    rng = random.Random(seed)
    spans = random_swarm(rng, (300, 1000, 2000)[seed])
    views = {s.peer_id: PeerView(rtt=rng.uniform(0.001, 0.2)) for s in spans}
    table = routing.SpanTable(spans)
    for start, end in ((0, 80), (10, 47)):
        chains = []
        for native in (True, False):
            monkeypatch.setattr(routing, "_native_ready", lambda native=native: native)
            chains.append([(x.peer.peer_id, x.start, x.end) for x in find_chain(table, "m", 80, (), start, end, views)])
        assert chains[0] == chains[1]
