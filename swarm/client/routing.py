"""Choose the chain of peers that covers a model's blocks in the least expected time per token.

A token's trip through a chain costs, per link, a round trip from this client to the peer (the client relays every
hop) plus the peer's compute for the blocks it serves in the chain:

    link seconds = RTT(peer) + blocks × (1 / throughput + load × marginal)

`throughput` is what the peer measured and announced (tokens/s through one block, one session); `marginal` is how
much each session already there adds to a step, from the peer's batched measurement (`batch_throughput`); `load` is
the sessions the peer serves now (its latest record or probe, plus what this client opened through it since then).
A peer without the free KV cache the new session needs (batch × length tokens, as its record says) costs a penalty:
it would make the session wait or refuse it. RTT comes from this client's probes,
smoothed; unknown peers get DEFAULT_RTT. Where this client has seen the peer's decode steps take longer per block than
its announcement implies, the observed time counts instead: a peer cannot attract traffic by overstating its speed.

The search is a shortest path over block boundaries, not a greedy walk: from boundary p, any routable span containing
p can take the session to any later boundary within it. Since a link's cost is linear in its blocks, the best chain
switches peers only where some span starts or ends, so those boundaries are the only nodes. Ties (equal cost) go to
the chain whose tightest peer has the most free KV, then to the lower peer ids (deterministic).

With server-to-server push (`push=True`: swarm.server.push) the states go from peer to peer, so two consecutive
peers a → b cost half of a's RTT and half of b's less than relaying through this client, plus their hop: a chain
saves `hop_saving` per hop that a measured and announced (`SpanInfo.next_rtt`, swarm.server.latency), never counting
the hop shorter than the difference of this client's RTTs to the two (the triangle inequality: a lie gains at most
that) nor longer than the relay. A link's cost then depends on the link before it, so that search runs over
(boundary, the span whose link ends there), vectorized per boundary; its ties go to the chain found first. A session
pushes only when all its peers take pushes, so where some do not, the best all-push chain competes with the best
relayed one.

In a large swarm (over PRUNE_ABOVE usable peers) a pushed route is that exact search over every span in C
(swarm_kernels.route_search, built at first use in the background; the same chain as the numpy search over every span).
Otherwise, and where no C compiler is found, the exact search runs only over the peers that can be on a best chain: of
spans over the same blocks, those another beats in both its fixed and its per-block cost go first; then a vectorized
pass (numpy; in C where built, with the same values, for relayed routes) computes the least cost from the first boundary
to every boundary and from every boundary to the last, and keeps a span only if its cheapest use between the two is
within PRUNE_SLACK of the best chain's cost (`prune`). Every best chain's spans pass, so the cost found is the same;
only which of several chains of equal cost wins may differ from the search over everything; with push, spans are kept by
a lower bound (`_survivors`: each link less the largest saving into it, the first link without, held against a chain
found among the PUSH_SEED most promising spans). The records are read as columns (`SpanTable`), which the router builds
once per refresh of its view, and the views as columns of its PeerHealth. On a 2-core AVX2 EPYC (`python -m
benchmarks.simulate --route-scale`) a route over 10,000 peers takes ~3 ms relayed (~8 ms all in numpy) and ~8 ms pushed
where every record names 4 hops (~30 ms in numpy); over 1,000 peers ~0.7 and ~1 ms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from swarm.protocol import BATCH_PROBE, NoChainError, SpanInfo

DEFAULT_RTT = 0.01  # seconds: a peer this client has not probed yet
UNKNOWN_BLOCK_SECONDS = 0.01  # per block and token, for a peer that announced no throughput
FULL_KV_PENALTY = 1.0  # seconds: a peer without the free KV cache a session needs makes it wait (or refuses it)
PRUNE_ABOVE = 48  # usable peers above which the exact search runs only over those that can be on a best chain
# a hop between two peers counts at least this round trip: each pushed step costs the peer its own work (receive,
# decode, queue, send) whatever the link, so on one host (1–3 ms measured) pushing saves nothing and a chain of more
# peers is not taken for free (an assumption, not a measurement)
MIN_HOP_RTT = 0.004
PRUNE_SLACK = 1e-6  # relative: spans whose cheapest use costs more than the best chain by this are left out
PUSH_SEED = 256  # spans a pushed search over a large swarm first searches exactly, for a cost to prune the rest by


@dataclass(frozen=True)
class Link:
    """Blocks [start, end) of a chain, served by one peer."""

    peer: SpanInfo
    start: int
    end: int


@dataclass(frozen=True)
class PeerView:
    """What this client knows about a peer beyond its record: smoothed RTT (None: not probed), how many more
    sessions it has opened through the peer than the record counts, and how long the peer's decode steps took per
    block for this client's sessions (None: no session through it yet)."""

    rtt: float | None = None
    extra_sessions: int = 0
    observed_block_seconds: float | None = None  # this client's decode steps through the peer, per block


class Views(Protocol):
    """What a search reads of this client's knowledge of each peer: a Mapping of peer id → PeerView will do; an
    object with the same `get` may also give every span's views at once as columns (`PeerHealth.view_columns`),
    which a search over thousands of peers then reads instead."""

    def get(self, peer_id: str, /) -> PeerView | None: ...


NO_VIEWS: Mapping[str, PeerView] = {}  # a client that knows nothing of any peer yet


def block_seconds(info: SpanInfo, load: int) -> float:
    """Expected seconds per token through one block of `info` with `load` other sessions on it."""
    if info.throughput <= 0:
        return UNKNOWN_BLOCK_SECONDS * (1 + 0.1 * load)
    single = 1.0 / info.throughput
    if info.batch_throughput > 0:
        batched = BATCH_PROBE / info.batch_throughput  # one step of BATCH_PROBE sessions
        marginal = max(0.0, (batched - single) / (BATCH_PROBE - 1))
    else:
        marginal = 0.1 * single
    return single + load * marginal


def link_seconds(info: SpanInfo, blocks: int, view: PeerView | None = None, need: int = 1) -> float:
    """Expected seconds per token of `blocks` blocks of `info`; `need`: KV tokens a new session would take there."""
    view = view or PeerView()
    load = max(0, info.active_sessions + view.extra_sessions)
    rtt = DEFAULT_RTT if view.rtt is None else view.rtt
    penalty = FULL_KV_PENALTY if info.free_kv_tokens < max(1, need) else 0.0
    per_block = block_seconds(info, load)
    if view.observed_block_seconds is not None:  # slower than announced: believe what was seen
        per_block = max(per_block, view.observed_block_seconds)
    return rtt + blocks * per_block + penalty


def chain_seconds(chain: Sequence[Link], views: Views | None = None, push: bool = False) -> float:
    """Expected seconds per token of a chain (`push`: its peers push to each other; the hops they measured count)."""
    views = NO_VIEWS if views is None else views
    seconds = sum(link_seconds(link.peer, link.end - link.start, views.get(link.peer.peer_id)) for link in chain)
    if push:
        spans = [link.peer for link in chain]
        seconds -= sum(saving for (i, j), saving in _savings(spans, views).items() if j == i + 1)
    return seconds


def missing_blocks(spans: Iterable[SpanInfo], num_blocks: int) -> list[tuple[int, int]]:
    """The runs of blocks [start, end) that none of `spans` serves."""
    bounds = np.array([(s.start, s.end) for s in spans], dtype=np.int64).reshape(-1, 2)
    return _holes(bounds[:, 0], bounds[:, 1], num_blocks)


def _holes(first: np.ndarray, last: np.ndarray, num_blocks: int) -> list[tuple[int, int]]:
    depth = np.zeros(num_blocks + 1, dtype=np.int64)  # +1 where a span starts, -1 after it ends
    np.add.at(depth, np.minimum(first, num_blocks), 1)
    np.add.at(depth, np.minimum(last, num_blocks), -1)
    uncovered = np.concatenate(([False], np.cumsum(depth[:num_blocks]) <= 0, [False]))
    edges = np.flatnonzero(uncovered[1:] != uncovered[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def can_hold(info: SpanInfo, length: int, batch: int = 1) -> bool:
    """Whether a peer accepts a session of `batch` rows up to `length` tokens at all (its limits, its whole KV
    budget; what is free now only makes it wait)."""
    return info.max_length >= length and (info.kv_budget_tokens <= 0 or info.kv_budget_tokens >= batch * length)


def find_chain(spans: Sequence[SpanInfo] | SpanTable, model_id: str, num_blocks: int, exclude: Iterable[str] = (),
               start: int = 0, end: int | None = None, views: Views | None = None, length: int = 0, batch: int = 1,
               push: bool = False) -> list[Link]:
    """The fastest chain over blocks [start, end) (default: the whole model) of routable peers not in `exclude` that
    can hold a session of `batch` x `length` tokens; raises NoChainError naming the uncovered blocks. A replacement
    for a failed part of a chain asks for that part only. `push`: the session's peers push to each other (see the
    module's docstring: hops between peers that measured them count as measured)."""
    end = num_blocks if end is None else end
    excluded, views, need = set(exclude), NO_VIEWS if views is None else views, batch * length
    hops: Hops | None = None
    if isinstance(spans, SpanTable) or len(spans) > PRUNE_ABOVE:  # (see the module's docstring)
        table = spans if isinstance(spans, SpanTable) else SpanTable(spans)
        rows = table.usable(num_blocks, excluded, length, batch)
        fixed, per_block, rtt = table.costs(rows, views, need)
        hops = _table_hops(table, rows, fixed, per_block, rtt) if push else None
        if hops is not None and len(rows) > PRUNE_ABOVE and _native_ready():  # every span, exactly, in C
            found = _pushed_table(table, rows, start, end, fixed, per_block, hops)
            if found is None:
                holes = [(max(s, start), min(e, end)) for s, e in _holes(table.start[rows], table.end[rows], num_blocks)
                         if s < end and e > start]
                raise NoChainError(model_id, holes or [(start, end)])
            return found[0]
        if len(rows) > PRUNE_ABOVE:
            kept = _survivors(table, rows, start, end, fixed, per_block, hops)
            if kept is None:  # no chain: name the holes without searching thousands of spans
                holes = [(max(s, start), min(e, end)) for s, e in _holes(table.start[rows], table.end[rows], num_blocks)
                         if s < end and e > start]
                raise NoChainError(model_id, holes or [(start, end)])
            rows, hops = rows[kept], hops.take(kept) if hops else None
        usable = [table.spans[k] for k in rows]
        searched_hops = True  # (the table's were all there are)
    else:
        usable = [s for s in spans if s.routable and s.peer_id not in excluded and s.end <= num_blocks
                  and can_hold(s, length, batch)]
        searched_hops = False
    if hops is None:
        # a link over [p, q) of usable[k] costs costs[k] + (q - p) * ramps[k]
        costs = [link_seconds(span, 0, views.get(span.peer_id), need) for span in usable]
        ramps = [link_seconds(span, 1, views.get(span.peer_id), need) - cost
                 for span, cost in zip(usable, costs, strict=True)]
        savings = _savings(usable, views) if push and not searched_hops else {}
        if savings:
            source, target = (np.array(ends, dtype=np.int64) for ends in zip(*savings, strict=True))
            hops = Hops(np.array(costs), np.array(ramps), source, target, np.array(list(savings.values())))
    found = _search(usable, start, end, costs, ramps) if hops is None else _pushed(usable, start, end, hops)
    if found is None:
        holes = [(max(s, start), min(e, end)) for s, e in missing_blocks(usable, num_blocks) if s < end and e > start]
        raise NoChainError(model_id, holes or [(start, end)])
    return found[0]


def _pushed(usable: list[SpanInfo], start: int, end: int, hops: Hops) -> tuple[list[Link], float] | None:
    """The best chain when hops save. A session pushes only if every peer of its chain takes pushes
    (swarm.client.session), so where some do not, the best chain of those that do (hops counted) competes with the
    best chain of all (none counted)."""
    if all(span.push for span in usable):
        return _search_with_hops(usable, start, end, hops)
    takers = np.flatnonzero([span.push for span in usable])
    pushing = hops.take(takers)
    found = (_search_with_hops([usable[k] for k in takers], start, end, pushing) if pushing is not None
             else None)
    relayed = _search(usable, start, end, hops.fixed.tolist(), hops.per_block.tolist())
    return min((f for f in (found, relayed) if f is not None), key=lambda f: f[1], default=None)


def _native_ready() -> bool:
    """Whether the C search of pushed chains is built (swarm_kernels.route_search.ready: the first ask builds it in
    the background; numpy searches until then)."""
    from swarm_kernels import route_search

    return route_search.ready()


def _pushed_table(table: SpanTable, rows: np.ndarray, start: int, end: int, fixed: np.ndarray, per_block: np.ndarray,
                  hops: Hops) -> tuple[list[Link], float] | None:
    """`_pushed` over the spans in `rows` of a table, without pruning: the best chain of the spans that take pushes,
    by the C search over all of them, against (where some do not) the best relayed chain of all (pruned, `_search`)."""
    takers = np.flatnonzero(table.push[rows])
    pushing = hops if len(takers) == len(rows) else hops.take(takers)
    found = None
    if pushing is not None:
        among = rows[takers]
        links = _hop_links(table.start[among], table.end[among], start, end, pushing, native=True)
        if links is not None:
            found = ([Link(table.spans[among[k]], p, q) for k, p, q in links[0]], links[1])
    if len(takers) == len(rows):
        return found
    kept = _survivors(table, rows, start, end, fixed, per_block, None)
    relayed = None
    if kept is not None:
        relayed = _search([table.spans[k] for k in rows[kept]], start, end, fixed[kept].tolist(),
                          per_block[kept].tolist())
    return min((f for f in (found, relayed) if f is not None), key=lambda f: f[1], default=None)


@dataclass(frozen=True)
class Hops:
    """A pushed search's inputs over `usable` spans: each span's fixed and per-block cost, and the hops that save
    (source[e] followed by target[e] saves saving[e] seconds; positions in `usable`)."""

    fixed: np.ndarray
    per_block: np.ndarray
    source: np.ndarray
    target: np.ndarray
    saving: np.ndarray

    def take(self, kept: np.ndarray) -> Hops | None:
        """The same over the spans at positions `kept` (ascending); None when no saving hop is left among them."""
        position = np.full(len(self.fixed), -1)
        position[kept] = np.arange(len(kept))
        source, target = position[self.source], position[self.target]
        among = (source >= 0) & (target >= 0)
        if not among.any():
            return None
        return Hops(self.fixed[kept], self.per_block[kept], source[among], target[among], self.saving[among])


def _table_hops(table: SpanTable, rows: np.ndarray, fixed: np.ndarray, per_block: np.ndarray, rtt: np.ndarray
                ) -> Hops | None:
    """The hops that save among the spans in `rows` (as `_savings`, vectorized); None when none does."""
    position = np.full(len(table), -1)
    position[rows] = np.arange(len(rows))
    a, b = position[table.edge_from], position[table.edge_to]
    among = (a >= 0) & (b >= 0)
    a, b, rtt_ab = a[among], b[among], table.edge_rtt[among]
    saving = hop_saving(rtt[a], rtt[b], rtt_ab)
    saves = saving > 0
    return Hops(fixed, per_block, a[saves], b[saves], saving[saves]) if saves.any() else None


def _search(usable: list[SpanInfo], start: int, end: int, fixed: list[float], per_block: list[float]
            ) -> tuple[list[Link], float] | None:
    """The exact search over boundaries (see the module's docstring): the chain and its cost; None when no chain
    exists.

    Walking the boundaries from the end down, reach[k] holds the best (q * per_block[k] + cost from q, -(tightest
    free KV), peer ids) over the ends q seen so far within usable[k], so each boundary costs one look at each span
    (not at each span and each end)."""
    nodes = sorted({start, end, *(b for s in usable for b in (s.start, s.end) if start < b < end)})
    # best[p]: (seconds, -(tightest free KV), peer ids) of the best chain from boundary p to `end`
    best: dict[int, tuple[float, int, tuple[str, ...]]] = {end: (0.0, -(1 << 62), ())}
    choice: dict[int, tuple[SpanInfo, int]] = {}
    reach: dict[int, tuple[float, int, tuple[str, ...], int]] = {}  # index in usable → (key..., q)

    def offer(q: int) -> None:  # q is now a possible end for every span that covers block q - 1
        seconds, neg_free, ids = best[q]
        for k, span in enumerate(usable):
            if span.start < q <= span.end:
                key = (q * per_block[k] + seconds, max(neg_free, -span.free_kv_tokens), (span.peer_id, *ids), q)
                if k not in reach or key[:3] < reach[k][:3]:
                    reach[k] = key

    offer(end)
    for p in reversed(nodes[:-1]):
        for k, span in enumerate(usable):
            if k in reach and span.start <= p < span.end:
                through, neg_free, ids, q = reach[k]
                seconds = fixed[k] + through - p * per_block[k]
                candidate = (round(seconds, 9), neg_free, ids)
                if p not in best or candidate < best[p]:
                    best[p], choice[p] = candidate, (span, q)
        if p in best:
            offer(p)
    if start not in best or not math.isfinite(best[start][0]):
        return None
    chain, p = [], start
    while p < end:
        span, q = choice[p]
        chain.append(Link(span, p, q))
        p = q
    return chain, best[start][0]


def hop_saving(rtt_a: Any, rtt_b: Any, rtt_ab: Any) -> Any:
    """Seconds a token saves when peer a pushes to peer b (round trip `rtt_ab`, as a measured it) instead of both
    answering this client (round trips `rtt_a`, `rtt_b`): half of a → client → b less half of a → b. A measurement
    below |rtt_a − rtt_b| breaks the triangle inequality (a claim too good to be true): that bound counts instead;
    and none below MIN_HOP_RTT (a pushed step's own work at the peer, whatever the link)."""
    hop = np.maximum(np.maximum(rtt_ab, np.abs(rtt_a - rtt_b)), MIN_HOP_RTT)
    return np.maximum(0.0, (rtt_a + rtt_b - hop) / 2)  # (arrays too)


def _savings(usable: list[SpanInfo], views: Views) -> dict[tuple[int, int], float]:
    """(i, j) → seconds saved when usable[i] is followed by usable[j] in a pushed chain (both take pushes, and i
    measured its round trip to j)."""
    def rtt(span: SpanInfo) -> float:
        view = views.get(span.peer_id)
        return DEFAULT_RTT if view is None or view.rtt is None else view.rtt

    takers: dict[str, list[int]] = {}
    for k, span in enumerate(usable):
        if span.push:
            takers.setdefault(span.peer_id, []).append(k)
    savings = {}
    for i, a in enumerate(usable):
        if a.push and a.next_rtt:
            for peer, rtt_ab in a.next_rtt:
                for j in takers.get(peer, ()):
                    if j != i and (saving := float(hop_saving(rtt(a), rtt(usable[j]), rtt_ab))) > 0:
                        savings[i, j] = saving
    return savings


def _search_with_hops(usable: Sequence[SpanInfo], start: int, end: int, hops: Hops
                      ) -> tuple[list[Link], float] | None:
    """The exact search when some consecutive links save (hops.saving; `_hop_links`): the chain and its cost
    (None: no chain); of chains of equal cost, the one found first (not by free KV, as `_search`)."""
    found = _hop_links(np.array([s.start for s in usable], dtype=np.int64),
                       np.array([s.end for s in usable], dtype=np.int64), start, end, hops)
    return None if found is None else ([Link(usable[k], p, q) for k, p, q in found[0]], found[1])


def _hop_links(starts: np.ndarray, ends: np.ndarray, start: int, end: int, hops: Hops, native: bool = False
               ) -> tuple[list[tuple[int, int, int]], float] | None:
    """The exact search over spans covering blocks [starts, ends) when some consecutive links save: the chain's links
    as (span's position, first block, end block) and its cost; None when there is no chain. A link's cost depends on
    the one before it, so the state is (boundary q, the span whose link ends at q). Walking the boundaries up,
    entry[k] holds the best (cost of the chain before + fixed[k] − x_p · per_block[k]) over the entry points p so far
    within k, with the saving from the link before it; a link of k that ends at q costs entry[k] + x_q ·
    per_block[k]. Each boundary is a few numpy operations over the spans entering and leaving there and the hops
    that can be taken there (from a span leaving it to one entering it), so thousands of spans take milliseconds;
    `native`: the same search in C (swarm_kernels.route_search: the same chain, ~4 ms over 10,000 spans)."""
    if native:
        from swarm_kernels import route_search

        found = route_search.pushed_chain(starts, ends, start, end, hops.fixed, hops.per_block, hops.source,
                                          hops.target, hops.saving)
        if found is not None:
            return (list(found[0]), found[1]) if found[0] else None
    first_block, last_block = np.maximum(starts, start), np.minimum(ends, end)
    inside = np.flatnonzero(first_block < last_block)
    nodes = np.unique(np.concatenate(([start, end], first_block[inside], last_block[inside])))
    first, last = np.searchsorted(nodes, first_block), np.searchsorted(nodes, last_block)
    n, x = len(nodes), nodes.astype(np.float64)
    spans_at = _by_boundary(n, first[inside], last[inside], inside)  # j → spans entering at boundary j
    # a hop s → t can be taken at boundary j when s leaves there (first_s < j <= last_s) and t enters (first_t <= j
    # < last_t)
    s, t = hops.source, hops.target
    low, high = np.maximum(first[s] + 1, first[t]), np.minimum(last[s], last[t] - 1)
    usable_hops = np.flatnonzero(low <= high)
    hops_at = _by_boundary(n, low[usable_hops], high[usable_hops] + 1, usable_hops)
    fixed, per_block = hops.fixed, hops.per_block
    entry = np.full(len(starts), np.inf)
    entry_node = np.full(len(starts), -1)  # the boundary each entry was made at
    entry_before = np.full(len(starts), -1)  # the span whose link ended there (-1: the chain's start)
    arrived = np.full(len(starts), np.inf)
    seen: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}  # j → (spans, cost, node, before)
    for j in range(n):
        leaving = spans_at(j - 1) if j > 0 else np.empty(0, dtype=np.int64)
        cost = entry[leaving] + x[j] * per_block[leaving]
        seen[j] = (leaving, cost, entry_node[leaving], entry_before[leaving])
        entering = spans_at(j) if j < n - 1 else np.empty(0, dtype=np.int64)
        if j == 0:
            base, base_span = 0.0, -1
        elif leaving.size and np.isfinite(cost.min()):
            best = int(np.argmin(cost))
            base, base_span = float(cost[best]), int(leaving[best])
        else:
            continue
        if not entering.size:
            continue
        before_cost, before = np.full(len(entering), base), np.full(len(entering), base_span)
        taken = hops_at(j)
        if taken.size:
            arrived[leaving] = cost
            offered = arrived[s[taken]] - hops.saving[taken]
            at = np.searchsorted(entering, t[taken])  # (entering is ascending)
            order = np.lexsort((offered, at))  # per entering span, its cheapest hop first
            head = order[np.concatenate(([True], at[order][1:] != at[order][:-1]))]
            better = offered[head] < before_cost[at[head]]
            before_cost[at[head][better]] = offered[head][better]
            before[at[head][better]] = s[taken][head][better]
            arrived[leaving] = np.inf
        value = before_cost + fixed[entering] - x[j] * per_block[entering]
        improves = value < entry[entering]
        k = entering[improves]
        entry[k], entry_node[k], entry_before[k] = value[improves], j, before[improves]
    leaving, cost, _, _ = seen[n - 1]
    if not leaving.size or not np.isfinite(cost.min()):
        return None
    total = float(cost.min())
    chain, j, k = [], n - 1, int(leaving[int(np.argmin(cost))])
    while k >= 0:
        spans, _, entered_at, came_from = seen[j]
        at = int(np.searchsorted(spans, k))
        p = int(entered_at[at])
        chain.append((k, int(nodes[p]), int(nodes[j])))
        j, k = p, int(came_from[at])
    return chain[::-1], total


def _by_boundary(n: int, first: np.ndarray, last: np.ndarray, items: np.ndarray) -> Callable[[int], np.ndarray]:
    """For boundaries 0..n-1, the items (ascending) whose range [first, last) holds each: `at(j)`. Each item is
    listed once per boundary it covers (a 16-bit radix sort by boundary)."""
    counts = last - first
    node_of = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
               + np.repeat(first, counts)).astype(np.int16 if n < 1 << 15 else np.int64)
    members = np.repeat(items, counts)[np.argsort(node_of, kind="stable")]
    bounds = np.concatenate(([0], np.cumsum(np.bincount(node_of, minlength=n))))

    def at(j: int) -> np.ndarray:
        return members[bounds[j]:bounds[j + 1]]

    return at


class SpanTable:
    """The fields routing reads of a list of span records, as columns: built once per read of the records and
    shared by every search over them (in a swarm of thousands of peers, reading each record's fields again for each
    search would cost more than the search itself). `spans` is the list it was built from, in the same order."""

    def __init__(self, spans: Iterable[SpanInfo]):
        self.spans = list(spans)
        self.peer_ids = [s.peer_id for s in self.spans]
        self.rows: dict[str, list[int]] = {}
        for row, peer_id in enumerate(self.peer_ids):
            self.rows.setdefault(peer_id, []).append(row)
        fields = np.array([(s.start, s.end, s.throughput, s.batch_throughput, s.active_sessions, s.free_kv_tokens,
                            s.max_length, s.kv_budget_tokens, s.routable, s.push) for s in self.spans],
                          dtype=np.float64).reshape(len(self.spans), 10)
        (start, end, self.throughput, self.batch_throughput, self.active_sessions, self.free_kv_tokens,
         self.max_length, self.kv_budget_tokens, routable, push) = fields.T
        self.start, self.end = start.astype(np.int64), end.astype(np.int64)
        self.routable, self.push = routable > 0, push > 0
        # the round trips peers measured to their next peers (both taking pushes): rows a → b, seconds
        edges = [(a, b, rtt) for a, span in enumerate(self.spans) if span.push
                 for peer, rtt in span.next_rtt for b in self.rows.get(peer, ()) if b != a and self.spans[b].push]
        columns = np.array(edges, dtype=np.float64).reshape(len(edges), 3).T
        self.edge_from, self.edge_to = columns[0].astype(np.int64), columns[1].astype(np.int64)
        self.edge_rtt = columns[2]

    def __len__(self) -> int:
        return len(self.spans)

    def usable(self, num_blocks: int, exclude: Iterable[str], length: int, batch: int) -> np.ndarray:
        """Rows (indices) of the routable spans not in `exclude` that can hold the session (as `can_hold`)."""
        ok = (self.routable & (self.end <= num_blocks) & (self.max_length >= length)
              & ((self.kv_budget_tokens <= 0) | (self.kv_budget_tokens >= batch * length)))
        for peer_id in exclude:
            ok[self.rows.get(peer_id, [])] = False
        return np.flatnonzero(ok)

    def view_columns(self, views: Views) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(RTT, extra sessions, observed seconds per block) of every span from `views`, nan where unknown."""
        if hasattr(views, "view_columns"):
            return views.view_columns(self)
        rtt, extra, observed = np.full(len(self), math.nan), np.zeros(len(self)), np.full(len(self), math.nan)
        for row, view in enumerate(map(views.get, self.peer_ids)):  # (a view only for the peers it knows)
            if view is not None:
                rtt[row] = math.nan if view.rtt is None else view.rtt
                extra[row] = view.extra_sessions
                if view.observed_block_seconds is not None:
                    observed[row] = view.observed_block_seconds
        return rtt, extra, observed

    def costs(self, rows: np.ndarray, views: Views, need: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fixed, per_block, RTT) of the spans in `rows`: link_seconds(span, blocks) = fixed + blocks × per_block,
        by the same formulas as `link_seconds`."""
        rtt, extra, observed = (column[rows] for column in self.view_columns(views))
        rtt[np.isnan(rtt)] = DEFAULT_RTT
        load = np.maximum(0.0, self.active_sessions[rows] + extra)
        throughput, batch = self.throughput[rows], self.batch_throughput[rows]
        known = throughput > 0
        single = np.divide(1.0, throughput, out=np.zeros_like(throughput), where=known)
        batched = np.divide(BATCH_PROBE, batch, out=np.zeros_like(batch), where=batch > 0)
        marginal = np.where(batch > 0, np.maximum(0.0, (batched - single) / (BATCH_PROBE - 1)), 0.1 * single)
        per_block = np.fmax(np.where(known, single + load * marginal, UNKNOWN_BLOCK_SECONDS * (1 + 0.1 * load)),
                            observed)  # (fmax: a nan, nothing observed, leaves the announced figure)
        fixed = rtt + np.where(self.free_kv_tokens[rows] < max(1, need), FULL_KV_PENALTY, 0.0)
        return fixed, per_block, rtt


def prune(spans: Sequence[SpanInfo] | SpanTable, start: int, end: int, views: Views, need: int = 1
          ) -> list[SpanInfo]:
    """The spans that are on some chain over [start, end) costing at most the best one's cost × (1 + PRUNE_SLACK)
    (all of them when no chain exists: the exact search names the holes)."""
    table = spans if isinstance(spans, SpanTable) else SpanTable(spans)
    rows = np.arange(len(table))
    fixed, per_block, _ = table.costs(rows, views, need)
    return [table.spans[k] for k in _bound(table, rows, start, end, fixed, per_block)[0]]


def _survivors(table: SpanTable, rows: np.ndarray, start: int, end: int, fixed: np.ndarray, per_block: np.ndarray,
               hops: Hops | None) -> np.ndarray | None:
    """Positions in `rows` of the spans that can be on a best chain (`prune`; None: no chain). With hops that save,
    a chain costs less than the sum of its links, so spans are kept by a lower bound (each link's fixed cost less
    the largest saving into it, but the first link's, which nothing precedes), and none with a saving in or out is
    dropped as dominated (what it saves is not in its own costs). The bound is held against the cost of a real chain:
    the best, hops counted, over the PUSH_SEED spans of least bound (else the best chain without any saving)."""
    if hops is None:
        bounded = None
        if len(rows) > PRUNE_ABOVE and _native_ready():  # (the same pass in C: the same values)
            from swarm_kernels import route_search

            bounded = route_search.bound(table.start[rows], table.end[rows], start, end, fixed, per_block,
                                         table.free_kv_tokens[rows])
        if bounded is not None:
            through, best = bounded
            return np.flatnonzero(through <= best + PRUNE_SLACK * (1.0 + abs(best))) if math.isfinite(best) else None
        kept, best = _bound(table, rows, start, end, fixed, per_block)[:2]
        return np.searchsorted(rows, kept) if math.isfinite(best) else None
    most_into, most_out = np.zeros(len(rows)), np.zeros(len(rows))
    np.maximum.at(most_into, hops.target, hops.saving)
    np.maximum.at(most_out, hops.source, hops.saving)
    kept, lowest, through = _bound(table, rows, start, end, fixed - most_into, per_block, math.inf,
                                   fixed - most_into - most_out, fixed, fixed)
    if not math.isfinite(lowest):
        return None
    positions = np.searchsorted(rows, kept)
    positions = positions[np.isfinite(through[positions])]
    if len(positions) <= PUSH_SEED:
        return positions
    seed = np.sort(positions[np.argsort(through[positions], kind="stable")[:PUSH_SEED]])
    seeded = hops.take(seed)
    found = _search_with_hops([table.spans[k] for k in rows[seed]], start, end, seeded) if seeded is not None else None
    limit = found[1] if found is not None else _bound(table, rows, start, end, fixed, per_block)[1]
    return positions[through[positions] <= limit + PRUNE_SLACK * (1.0 + abs(limit))]


def _bound(table: SpanTable, rows: np.ndarray, start: int, end: int, fixed: np.ndarray, per_block: np.ndarray,
           limit: float | None = None, least_fixed: np.ndarray | None = None, own_fixed: np.ndarray | None = None,
           first_fixed: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """`prune` over the spans in `rows` (their costs in `fixed` and `per_block`, in the same order): the rows kept
    and the best chain's cost (inf: none). `limit`: keep what any chain costing up to it uses, instead of the best
    one; `own_fixed`: the fixed costs that dominance compares, where `fixed` are lower bounds; `least_fixed`: where a
    link's savings (hops in and out) can make it cost less than its own fixed cost, the least it can cost (such a
    span is dropped only if another costs less than that without any saving: `_dominated_despite_savings`);
    `first_fixed`: the fixed costs of links that start a chain, where they differ from `fixed` (default: the same).
    Also returns, per span in `rows`, the cost of its cheapest chain (inf: dropped as dominated, or on none).

    First, of spans over the same blocks, only those that no other is at least as cheap as in both its fixed and its
    per-block cost (`_undominated`). Then least costs from every boundary to `end` (a backward pass over the
    boundaries), and a forward pass that finds each span's cheapest chain through it (entering at p, leaving at a
    later q within it). Which spans a boundary enters (p in [first, last)) is listed once, by boundary; a boundary q
    leaves exactly the spans that the one before it enters."""
    lo, hi = np.maximum(table.start[rows], start), np.minimum(table.end[rows], end)
    inside = lo < hi
    if not inside.any():
        return rows, math.inf, np.full(len(rows), np.inf)
    nodes = np.unique(np.concatenate(([start, end], lo[inside], hi[inside])))
    inner = np.flatnonzero(inside)
    undominated = np.zeros(len(rows), dtype=bool)
    ranked = fixed if own_fixed is None else own_fixed
    group = lo[inner] * (end + 1) + hi[inner]
    if least_fixed is None:
        undominated[inner[_undominated(group, ranked[inner], per_block[inner],
                                       table.free_kv_tokens[rows[inner]])]] = True
    else:
        undominated[inner] = ~_dominated_despite_savings(group, ranked[inner], least_fixed[inner], per_block[inner])
    inner = np.flatnonzero(inside & undominated)
    n = len(nodes)
    enters = _by_boundary(n, np.searchsorted(nodes, lo[inner]), np.searchsorted(nodes, hi[inner]), inner)

    x = nodes.astype(np.float64)
    to_end, exit_cost = np.full(n, np.inf), np.full(len(rows), np.inf)  # min over q of x_q·P + to_end[q]
    to_end[n - 1] = 0.0
    first_fixed = fixed if first_fixed is None else first_fixed
    for j in range(n - 1, -1, -1):
        if j < n - 1 and (k := enters(j)).size:
            to_end[j] = ((first_fixed if j == 0 else fixed)[k] + exit_cost[k] - x[j] * per_block[k]).min()
        if j > 0 and np.isfinite(to_end[j]) and (k := enters(j - 1)).size:  # the spans that leave at j
            exit_cost[k] = np.minimum(exit_cost[k], x[j] * per_block[k] + to_end[j])
    best = to_end[0]
    if not np.isfinite(best):
        return rows, math.inf, np.full(len(rows), np.inf)
    # Forward: entry[k] = min over boundaries p seen so far within span k of from_start[p] + fixed − x_p·P[k]; at
    # each boundary q, a span leaving there costs entry + x_q·P + to_end[q] for the best chain through it.
    from_start, entry = np.full(n, np.inf), np.full(len(rows), np.inf)
    through = np.full(len(rows), np.inf)
    from_start[0] = 0.0
    for j in range(n):
        if j > 0 and (k := enters(j - 1)).size:
            reach = x[j] * per_block[k] + entry[k]
            from_start[j] = reach.min()
            through[k] = np.minimum(through[k], reach + to_end[j])
        if j < n - 1 and np.isfinite(from_start[j]) and (k := enters(j)).size:
            entering = (first_fixed if j == 0 else fixed)[k]
            entry[k] = np.minimum(entry[k], from_start[j] + entering - x[j] * per_block[k])
    limit = best if limit is None else limit
    return rows[through <= limit + PRUNE_SLACK * (1.0 + abs(limit))], float(best), through


def _dominated_despite_savings(group: np.ndarray, own: np.ndarray, least: np.ndarray, per_block: np.ndarray
                               ) -> np.ndarray:
    """A mask of the spans that another span of the same group beats even when they save all they can (`least`,
    their fixed cost less the largest savings into and out of them; `own` for a span without any): its own fixed
    cost less than their least and its per-block cost at most theirs. A chain through such a span with all its
    savings costs more than through the other span without any. Of spans equal in both, none is dropped."""
    n = len(group)
    # asks (0 .. n-1, at `least`) before offers (n .. 2n-1, at `own`) of the same value: never a span's own offer
    order = np.lexsort((np.concatenate((least, own)), np.concatenate((group, group))))
    ranks = np.tile(_ranks(per_block), 2)[order]
    # as in _undominated: one running minimum over all groups, earlier groups keyed larger
    dense = _dense(np.tile(group, 2)[order])
    key = (dense[-1] - dense) * (int(ranks.max()) + 1) + ranks
    asks = order < n
    offers = np.where(asks, np.iinfo(np.int64).max, key)
    before = np.concatenate(([np.iinfo(np.int64).max], np.minimum.accumulate(offers)[:-1]))
    out = np.zeros(n, dtype=bool)
    out[order[asks & (before <= key)]] = True
    return out


def _ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank among the distinct values (equal values, equal ranks)."""
    return np.unique(values, return_inverse=True)[1].reshape(-1)


def _dense(ordered: np.ndarray) -> np.ndarray:
    """Of values in ascending order: 0 for the first distinct value, 1 for the next, ..."""
    return np.concatenate(([0], np.cumsum(ordered[1:] != ordered[:-1])))


def _undominated(group: np.ndarray, fixed: np.ndarray, per_block: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Indices of the spans that no other span of the same group (the same blocks) is at least as cheap as in both
    costs: replacing a dominated span by its dominator never makes a chain dearer. Of spans equal in both, the one
    with the most free KV stays (the exact search prefers it on a tie)."""
    order = np.lexsort((-free, per_block, fixed, group))  # by group, then fixed, per-block, most free KV first
    groups, ranks = _dense(group[order]), _ranks(per_block)[order]
    # One running minimum over all groups at once: earlier groups get larger keys, so an earlier group's spans
    # never count against a later one's; a span stays when its per-block cost beats every earlier one's in its group.
    key = (groups.max() - groups) * (ranks.max() + 1) + ranks
    keep = np.ones(len(key), dtype=bool)
    keep[1:] = key[1:] < np.minimum.accumulate(key)[:-1]
    return np.sort(order[keep])
