"""Choose the chain of peers that covers a model's blocks in the least expected time per token.

A token's trip through a chain costs, per link, a round trip from this client to the peer (the client relays every
hop) plus the peer's compute for the blocks it serves in the chain:

    link seconds = RTT(peer) + blocks × (1 / throughput + load × marginal)

`throughput` is what the peer measured and announced (tokens/s through one block, one session); `marginal` is how
much each session already there adds to a step, from the peer's batched measurement (`batch_throughput`); `load` is
the sessions the peer serves now (its latest record or probe, plus what this client opened through it since then).
A peer with no free KV cache costs a penalty (it would make a new session wait). RTT comes from this client's probes,
smoothed; unknown peers get DEFAULT_RTT. Where this client has seen the peer's decode steps take longer per block than
its announcement implies, the observed time counts instead: a peer cannot attract traffic by overstating its speed.

The search is a shortest path over block boundaries, not a greedy walk: from boundary p, any routable span containing
p can take the session to any later boundary within it. Since a link's cost is linear in its blocks, the best chain
switches peers only where some span starts or ends, so those boundaries are the only nodes. Ties (equal cost) go to
the chain whose tightest peer has the most free KV, then to the lower peer ids (deterministic).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from swarm.protocol import BATCH_PROBE, NoChainError, SpanInfo

DEFAULT_RTT = 0.01  # seconds: a peer this client has not probed yet
UNKNOWN_BLOCK_SECONDS = 0.01  # per block and token, for a peer that announced no throughput
FULL_KV_PENALTY = 1.0  # seconds: a peer without free KV cache makes a new session wait (or refuses it)


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


def link_seconds(info: SpanInfo, blocks: int, view: PeerView | None = None) -> float:
    view = view or PeerView()
    load = max(0, info.active_sessions + view.extra_sessions)
    rtt = DEFAULT_RTT if view.rtt is None else view.rtt
    penalty = FULL_KV_PENALTY if info.free_kv_tokens <= 0 else 0.0
    per_block = block_seconds(info, load)
    if view.observed_block_seconds is not None:  # slower than announced: believe what was seen
        per_block = max(per_block, view.observed_block_seconds)
    return rtt + blocks * per_block + penalty


def chain_seconds(chain: Iterable[Link], views: Mapping[str, PeerView] | None = None) -> float:
    """Expected seconds per token of a chain."""
    views = views or {}
    return sum(link_seconds(link.peer, link.end - link.start, views.get(link.peer.peer_id)) for link in chain)


def missing_blocks(spans: Iterable[SpanInfo], num_blocks: int) -> list[tuple[int, int]]:
    covered = [False] * num_blocks
    for span in spans:
        for block in range(span.start, min(span.end, num_blocks)):
            covered[block] = True
    holes, start = [], None
    for block, ok in enumerate([*covered, True]):
        if not ok and start is None:
            start = block
        elif ok and start is not None:
            holes.append((start, block))
            start = None
    return holes


def can_hold(info: SpanInfo, length: int, batch: int = 1) -> bool:
    """Whether a peer accepts a session of `batch` rows up to `length` tokens at all (its limits, its whole KV
    budget; what is free now only makes it wait)."""
    return info.max_length >= length and (info.kv_budget_tokens <= 0 or info.kv_budget_tokens >= batch * length)


def find_chain(spans: list[SpanInfo], model_id: str, num_blocks: int, exclude: Iterable[str] = (),
               start: int = 0, end: int | None = None,
               views: Mapping[str, PeerView] | None = None, length: int = 0, batch: int = 1) -> list[Link]:
    """The fastest chain over blocks [start, end) (default: the whole model) of routable peers not in `exclude` that
    can hold a session of `batch` x `length` tokens; raises NoChainError naming the uncovered blocks. A replacement
    for a failed part of a chain asks for that part only."""
    end = num_blocks if end is None else end
    excluded, views = set(exclude), views or {}
    usable = [s for s in spans if s.routable and s.peer_id not in excluded and s.end <= num_blocks
              and can_hold(s, length, batch)]
    nodes = sorted({start, end, *(b for s in usable for b in (s.start, s.end) if start < b < end)})
    # A link over [p, q) of span s costs fixed[s] + (q - p) * per_block[s]. Walking the boundaries from the end
    # down, reach[s] holds the best (q * per_block[s] + cost from q, -(tightest free KV), peer ids) over the ends q
    # seen so far within s, so each boundary costs one look at each span (not at each span and each end).
    fixed, per_block = {}, {}
    for span in usable:
        view = views.get(span.peer_id) or PeerView()
        fixed[span.peer_id] = link_seconds(span, 0, view)
        per_block[span.peer_id] = link_seconds(span, 1, view) - fixed[span.peer_id]
    # best[p]: (seconds, -(tightest free KV), peer ids) of the best chain from boundary p to `end`
    best: dict[int, tuple[float, int, tuple[str, ...]]] = {end: (0.0, -(1 << 62), ())}
    choice: dict[int, tuple[SpanInfo, int]] = {}
    reach: dict[int, tuple[float, int, tuple[str, ...], int]] = {}  # index in usable → (key..., q)

    def offer(q: int) -> None:  # q is now a possible end for every span that covers block q - 1
        seconds, neg_free, ids = best[q]
        for k, span in enumerate(usable):
            if span.start < q <= span.end:
                key = (q * per_block[span.peer_id] + seconds, max(neg_free, -span.free_kv_tokens),
                       (span.peer_id, *ids), q)
                if k not in reach or key[:3] < reach[k][:3]:
                    reach[k] = key

    offer(end)
    for p in reversed(nodes[:-1]):
        for k, span in enumerate(usable):
            if k in reach and span.start <= p < span.end:
                through, neg_free, ids, q = reach[k]
                seconds = fixed[span.peer_id] + through - p * per_block[span.peer_id]
                candidate = (round(seconds, 9), neg_free, ids)
                if p not in best or candidate < best[p]:
                    best[p], choice[p] = candidate, (span, q)
        if p in best:
            offer(p)
    if start not in best or not math.isfinite(best[start][0]):
        holes = [(max(s, start), min(e, end)) for s, e in missing_blocks(usable, num_blocks) if s < end and e > start]
        raise NoChainError(model_id, holes or [(start, end)])
    chain, p = [], start
    while p < end:
        span, q = choice[p]
        chain.append(Link(span, p, q))
        p = q
    return chain
