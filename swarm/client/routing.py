"""Choose the chain of peers that covers a model's blocks in the least expected time per token.

A token's trip through a chain costs, per link, a round trip from this client to the peer (the client relays every
hop) plus the peer's compute for the blocks it serves in the chain (swarm.client.costs: `link_seconds`, from the
peer's announced and this client's observed speed, its load, and whether it has room for the session's KV cache).

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
within PRUNE_SLACK of the best chain's cost (swarm.client.pruning: `prune`). Every best chain's spans pass, so the
cost found is the same; only which of several chains of equal cost wins may differ from the search over everything;
with push, spans are kept by a lower bound (`_survivors`: each link less the largest saving into it, the first link
without, held against a chain found among the PUSH_SEED most promising spans). The records are read as columns
(`SpanTable`), which the router builds once per refresh of its view, and the views as columns of its PeerHealth. On
a 2-core AVX2 EPYC (`python -m benchmarks.simulate --route-scale`) a route over 10,000 peers takes ~3 ms relayed (~8
ms all in numpy) and ~8 ms pushed where every record names 4 hops (~30 ms in numpy); over 1,000 peers ~0.7 and ~1 ms.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from swarm.client.costs import (  # noqa: F401 - re-exported: what routes are made of, and what they cost
    DEFAULT_RTT,
    FULL_KV_PENALTY,
    NO_VIEWS,
    UNKNOWN_BLOCK_SECONDS,
    Link,
    PeerView,
    Views,
    block_seconds,
    can_hold,
    gaps,
    link_seconds,
    missing_blocks,
)
from swarm.client.pruning import PRUNE_SLACK, SpanTable, bound, by_boundary, prune  # noqa: F401 - re-exported
from swarm.protocol import NoChainError, SpanInfo

PRUNE_ABOVE = 48  # usable peers above which the exact search runs only over those that can be on a best chain
# a hop between two peers counts at least this round trip: each pushed step costs the peer its own work (receive,
# decode, queue, send) whatever the link, so on one host (1–3 ms measured) pushing saves nothing and a chain of more
# peers is not taken for free (an assumption, not a measurement)
MIN_HOP_RTT = 0.004
PUSH_SEED = 256  # spans a pushed search over a large swarm first searches exactly, for a cost to prune the rest by


def chain_seconds(chain: Sequence[Link], views: Views | None = None, push: bool = False) -> float:
    """Expected seconds per token of a chain (`push`: its peers push to each other; the hops they measured count)."""
    views = NO_VIEWS if views is None else views
    seconds = sum(link_seconds(link.peer, link.end - link.start, views.get(link.peer.peer_id)) for link in chain)
    if push:
        spans = [link.peer for link in chain]
        seconds -= sum(saving for (i, j), saving in _savings(spans, views).items() if j == i + 1)
    return seconds


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
                holes = [(max(s, start), min(e, end)) for s, e in gaps(table.start[rows], table.end[rows], num_blocks)
                         if s < end and e > start]
                raise NoChainError(model_id, holes or [(start, end)])
            return found[0]
        if len(rows) > PRUNE_ABOVE:
            kept = _survivors(table, rows, start, end, fixed, per_block, hops)
            if kept is None:  # no chain: name the holes without searching thousands of spans
                holes = [(max(s, start), min(e, end)) for s, e in gaps(table.start[rows], table.end[rows], num_blocks)
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
    spans_at = by_boundary(n, first[inside], last[inside], inside)  # j → spans entering at boundary j
    # a hop s → t can be taken at boundary j when s leaves there (first_s < j <= last_s) and t enters (first_t <= j
    # < last_t)
    s, t = hops.source, hops.target
    low, high = np.maximum(first[s] + 1, first[t]), np.minimum(last[s], last[t] - 1)
    usable_hops = np.flatnonzero(low <= high)
    hops_at = by_boundary(n, low[usable_hops], high[usable_hops] + 1, usable_hops)
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
        kept, best = bound(table, rows, start, end, fixed, per_block)[:2]
        return np.searchsorted(rows, kept) if math.isfinite(best) else None
    most_into, most_out = np.zeros(len(rows)), np.zeros(len(rows))
    np.maximum.at(most_into, hops.target, hops.saving)
    np.maximum.at(most_out, hops.source, hops.saving)
    kept, lowest, through = bound(table, rows, start, end, fixed - most_into, per_block, math.inf,
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
    limit = found[1] if found is not None else bound(table, rows, start, end, fixed, per_block)[1]
    return positions[through[positions] <= limit + PRUNE_SLACK * (1.0 + abs(limit))]
