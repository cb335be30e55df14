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


def find_chain(spans: list[SpanInfo], model_id: str, num_blocks: int, banned: Iterable[str] = ()) -> list[Link]:
    """The best chain over blocks [0, num_blocks); raises NoChainError naming the uncovered blocks."""
    banned = set(banned)
    usable = [s for s in spans if s.peer_id not in banned and s.end <= num_blocks]
    # best[p] = (hops, -min free KV along the way) from block p to the end; choice[p] = the span taken at p.
    best: dict[int, tuple[int, int]] = {num_blocks: (0, -(1 << 62))}
    choice: dict[int, SpanInfo] = {}
    for p in range(num_blocks - 1, -1, -1):
        for span in usable:
            if span.start <= p < span.end and span.end in best:
                hops, neg_free = best[span.end]
                candidate = (hops + 1, max(neg_free, -span.free_kv_tokens))
                if p not in best or candidate < best[p]:
                    best[p], choice[p] = candidate, span
    if 0 not in best:
        raise NoChainError(model_id, missing_blocks(usable, num_blocks) or [(0, num_blocks)])
    chain, p = [], 0
    while p < num_blocks:
        span = choice[p]
        chain.append(Link(span, p, span.end))
        p = span.end
    return chain
