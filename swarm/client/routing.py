"""Choose a chain of peers that covers every block of a model.

The search is a shortest path over block boundaries: from block p, any live span containing p can take the session
to its end. Fewest hops wins (each hop costs a network round trip); among equal chains, more free KV capacity wins.
A peer may serve only part of its span in a chain, so overlapping spans compose.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from swarm.protocol import NoChainError, SpanInfo


@dataclass(frozen=True)
class Link:
    """Blocks [start, end) of a chain, served by one peer."""

    peer: SpanInfo
    start: int
    end: int


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


def find_chain(spans: list[SpanInfo], model_id: str, num_blocks: int, banned: Iterable[str] = (),
               start: int = 0, end: int | None = None) -> list[Link]:
    """The best chain over blocks [start, end) (default: the whole model); raises NoChainError naming the
    uncovered blocks. A replacement for a failed part of a chain asks for that part only."""
    end = num_blocks if end is None else end
    banned = set(banned)
    usable = [s for s in spans if s.peer_id not in banned and s.end <= num_blocks]
    # best[p] = (hops, -min free KV along the way) from block p to `end`; choice[p] = the span taken at p.
    best: dict[int, tuple[int, int]] = {end: (0, -(1 << 62))}
    choice: dict[int, SpanInfo] = {}
    for p in range(end - 1, start - 1, -1):
        for span in usable:
            stop = min(span.end, end)
            if span.start <= p < stop and stop in best:
                hops, neg_free = best[stop]
                candidate = (hops + 1, max(neg_free, -span.free_kv_tokens))
                if p not in best or candidate < best[p]:
                    best[p], choice[p] = candidate, span
    if start not in best:
        holes = [(max(s, start), min(e, end)) for s, e in missing_blocks(usable, num_blocks) if s < end and e > start]
        raise NoChainError(model_id, holes or [(start, end)])
    chain, p = [], start
    while p < end:
        span = choice[p]
        chain.append(Link(span, p, min(span.end, end)))
        p = min(span.end, end)
    return chain
