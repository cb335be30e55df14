"""What routing counts a link to cost, and the types it routes with (swarm.client.routing searches over them).

    link seconds = RTT(peer) + blocks × (1 / throughput + load × marginal)   (+ FULL_KV_PENALTY without room)

`throughput` is what the peer measured and announced (tokens/s through one block, one session); `marginal` is how
much each session already there adds to a step, from the peer's batched measurement (`batch_throughput`); `load` is
the sessions the peer serves now (its latest record or probe, plus what this client opened through it since then).
RTT comes from this client's probes, smoothed; unknown peers get DEFAULT_RTT. Where this client has seen the peer's
decode steps take longer per block than its announcement implies, the observed time counts instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from swarm.protocol import BATCH_PROBE, SpanInfo

DEFAULT_RTT = 0.01  # seconds: a peer this client has not probed yet
UNKNOWN_BLOCK_SECONDS = 0.01  # per block and token, for a peer that announced no throughput
FULL_KV_PENALTY = 1.0  # seconds: a peer without the free KV cache a session needs makes it wait (or refuses it)


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


def missing_blocks(spans: Iterable[SpanInfo], num_blocks: int) -> list[tuple[int, int]]:
    """The runs of blocks [start, end) that none of `spans` serves."""
    bounds = np.array([(s.start, s.end) for s in spans], dtype=np.int64).reshape(-1, 2)
    return gaps(bounds[:, 0], bounds[:, 1], num_blocks)


def gaps(first: np.ndarray, last: np.ndarray, num_blocks: int) -> list[tuple[int, int]]:
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
