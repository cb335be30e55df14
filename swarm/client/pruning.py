"""The records as columns (`SpanTable`), and the pass that leaves out the spans no best chain can use (`prune`).

In a large swarm the exact route search (swarm.client.routing) runs only over the peers that can be on a best chain:
of spans over the same blocks, those another beats in both its fixed and its per-block cost go first; then a
vectorized pass computes the least cost from the first boundary to every boundary and from every boundary to the
last, and keeps a span only if its cheapest use between the two is within PRUNE_SLACK of the best chain's cost. Every
best chain's spans pass, so the cost found is the same. The records are read as columns, which the router builds once
per refresh of its view, and the views as columns of its PeerHealth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from swarm.client.costs import DEFAULT_RTT, FULL_KV_PENALTY, UNKNOWN_BLOCK_SECONDS, Views
from swarm.protocol import BATCH_PROBE, SpanInfo

PRUNE_SLACK = 1e-6  # relative: spans whose cheapest use costs more than the best chain by this are left out


def by_boundary(n: int, first: np.ndarray, last: np.ndarray, items: np.ndarray) -> Callable[[int], np.ndarray]:
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
    return [table.spans[k] for k in bound(table, rows, start, end, fixed, per_block)[0]]


def bound(table: SpanTable, rows: np.ndarray, start: int, end: int, fixed: np.ndarray, per_block: np.ndarray,
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
    per-block cost (`undominated`). Then least costs from every boundary to `end` (a backward pass over the
    boundaries), and a forward pass that finds each span's cheapest chain through it (entering at p, leaving at a
    later q within it). Which spans a boundary enters (p in [first, last)) is listed once, by boundary; a boundary q
    leaves exactly the spans that the one before it enters."""
    lo, hi = np.maximum(table.start[rows], start), np.minimum(table.end[rows], end)
    inside = lo < hi
    if not inside.any():
        return rows, math.inf, np.full(len(rows), np.inf)
    nodes = np.unique(np.concatenate(([start, end], lo[inside], hi[inside])))
    inner = np.flatnonzero(inside)
    kept = np.zeros(len(rows), dtype=bool)
    ranked = fixed if own_fixed is None else own_fixed
    group = lo[inner] * (end + 1) + hi[inner]
    if least_fixed is None:
        kept[inner[undominated(group, ranked[inner], per_block[inner], table.free_kv_tokens[rows[inner]])]] = True
    else:
        kept[inner] = ~_dominated_despite_savings(group, ranked[inner], least_fixed[inner], per_block[inner])
    inner = np.flatnonzero(inside & kept)
    n = len(nodes)
    enters = by_boundary(n, np.searchsorted(nodes, lo[inner]), np.searchsorted(nodes, hi[inner]), inner)

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
    # as in undominated: one running minimum over all groups, earlier groups keyed larger
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


def undominated(group: np.ndarray, fixed: np.ndarray, per_block: np.ndarray, free: np.ndarray) -> np.ndarray:
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
