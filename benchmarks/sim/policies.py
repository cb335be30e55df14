"""The two policies the simulator compares: this project's shipped placement and routing, and Petals' as published.

`Ours` calls `swarm.server.placement` and `swarm.client.routing` unchanged, with this project's default periods
(announce every 5 s, records live 3 announcements, rebalance checks every 30 s ± 20%, the client's view refreshed
every 3 s; both reads stretched by `swarm.dht.read_period` in a large swarm). Records carry the load fields a peer
announces (active sessions, free KV). A session's KV is reserved as its cache grows, in SpanKVCache.GROW chunks
(swarm.server.backend), up to its max_length; a peer that cannot grow one makes it wait up to `admission_wait`
(5 s), then refuses it and the client replaces that link.

`Petals` re-implements Petals 2.2's policy from its paper and documentation, no code copied:
- block selection: a joining server takes the window whose throughputs, sorted, are lexicographically smallest
  (it maximises the minimum, then the next smallest, ...), counting joining and online servers;
- rebalancing: every ~120 s (its mean balance check period) a server takes itself out, finds its best window, and
  moves when the swarm's minimum block throughput would grow so that before/after < 0.75 (its `balance_quality`).
  Petals also lets every other server re-choose in a simulated pass before deciding; that pass (O(servers² ×
  blocks) a check) is left out here, so the baseline may move more or less readily than Petals itself;
- routing: the chain of least latency, where a hop costs the client's ping to the server plus its blocks' compute
  at the throughput it announced, servers without enough free cache left out: a Dijkstra over (block, server) in
  Petals. Its records carry no load, so its routes do not spread sessions by load. The shortest path itself is
  computed here by the same exact search as ours (`find_chain` over load-free records), since both find the least
  cost chain; `dijkstra_chain` is Petals' graph search, timed on its own for route computation cost.
- KV: a session's whole max_length (prompt + max_new_tokens) is allocated when it opens (its handler's
  `_allocate_cache`; `generate` insists on one of the two to reserve it); its records' `cache_tokens_left`
  keep routes off servers without that much.
- execution: a server runs each session's inference step on its own (its PrioritizedTaskPool "does *not* combine
  incoming requests into batches"), so n sessions on it make every step n times a single one's; ours batch them.
  `Petals(batches_sessions=True)` gives it our batching: the policies alone, compared on the same execution.
- periods: records announced every 60 s and living 120 s; a client's view refreshed every 60 s.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

import numpy as np

from swarm.client.routing import Link, PeerView, SpanTable, find_chain
from swarm.dht import read_period
from swarm.model.span import SpanKVCache
from swarm.protocol import PeerState, SpanInfo
from swarm.server import placement


class Ours:
    name = "ours"
    announce_s, ttl_s, rebalance_s, client_refresh_s = 5.0, 15.0, 30.0, 3.0
    carries_load = True
    batches_sessions = True  # swarm.server.scheduler: decode steps of different sessions in one forward

    def rebalance_every(self, records: int) -> float:
        return read_period(self.rebalance_s, records)  # as swarm.server.peer does

    def client_refresh(self, records: int) -> float:
        return read_period(self.client_refresh_s, records)  # as swarm.client.router does

    def kv_tokens(self, context: int, max_length: int) -> int:
        """KV a session of `context` tokens holds on a peer: its cache's growth chunks (swarm.server.memory)."""
        return SpanKVCache.reserved_tokens(context, max_length)

    def join(self, view: list[SpanInfo], peer_id: str, length: int, num_blocks: int) -> tuple[int, int]:
        return placement.choose_span(view, num_blocks, length, exclude=peer_id)

    def move(self, view: list[SpanInfo], me: SpanInfo) -> tuple[int, int] | None:
        return placement.move_for(view, me)

    def route(self, view: SpanTable, rtts: Mapping[str, PeerView], num_blocks: int, length: int,
              start: int, end: int, exclude: set[str], push: bool = False) -> list[Link]:
        return find_chain(view, "m", num_blocks, exclude, start, end, rtts, length, push=push)


class Petals:
    name = "petals"
    announce_s, ttl_s, rebalance_s, client_refresh_s = 60.0, 120.0, 120.0, 60.0
    carries_load = False
    batches_sessions = False  # its PrioritizedTaskPool runs each session's inference step on its own
    balance_quality = 0.75

    def __init__(self, batches_sessions: bool = False):
        self.batches_sessions = batches_sessions

    def rebalance_every(self, records: int) -> float:
        return self.rebalance_s

    def client_refresh(self, records: int) -> float:
        return self.client_refresh_s

    def kv_tokens(self, context: int, max_length: int) -> int:
        """KV a session holds: its whole max_length from the open on (Petals' handler allocates it at once)."""
        return max_length

    def join(self, view: list[SpanInfo], peer_id: str, length: int, num_blocks: int) -> tuple[int, int]:
        start = best_start(strength(view, num_blocks, exclude=peer_id), length)
        return start, start + length

    def move(self, view: list[SpanInfo], me: SpanInfo) -> tuple[int, int] | None:
        others = strength(view, me.num_blocks, exclude=me.peer_id)
        length = me.end - me.start
        start = best_start(others, length)
        if start == me.start:
            return None
        before, after = others.copy(), others.copy()
        before[me.start : me.end] += me.throughput
        after[start : start + length] += me.throughput
        eps = 1e-3
        if after.min() < eps or after.min() < before.min():
            return None
        return (start, start + length) if before.min() / after.min() < self.balance_quality - eps else None

    def route(self, view: SpanTable, rtts: Mapping[str, PeerView], num_blocks: int, length: int,
              start: int, end: int, exclude: set[str], push: bool = False) -> list[Link]:
        return find_chain(view, "m", num_blocks, exclude, start, end, rtts, length, push=push)


def strength(view: list[SpanInfo], num_blocks: int, exclude: str | None = None) -> np.ndarray:
    """Per block, the summed announced throughput of joining and online servers (Petals' `compute_throughputs`)."""
    total = np.zeros(num_blocks)
    for info in view:
        if info.peer_id == exclude or info.state not in (PeerState.JOINING, PeerState.ONLINE):
            continue
        start, end = (info.target_start, info.target_end) if info.target_end > info.target_start else (
            info.start, info.end)
        total[start:end] += info.throughput
    return total


def best_start(throughputs: np.ndarray, length: int) -> int:
    """The window whose sorted throughputs are lexicographically smallest (ties: the earliest)."""
    length = min(length, len(throughputs))
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(throughputs, length), axis=1)
    order = np.lexsort(windows.T[::-1])
    return int(order[0])


def dijkstra_chain(view: list[SpanInfo], rtts: Mapping[str, PeerView], num_blocks: int,
                   length: int) -> list[tuple[str, int, int]]:
    """Petals' route search: Dijkstra over nodes (block, server) and (block boundary); entering a server at a
    boundary costs the client's ping to it, each block its compute at the announced throughput. Used to time
    Petals' route computation."""
    servers = [s for s in view if s.routable and s.kv_budget_tokens >= length and s.free_kv_tokens >= length]
    starting: list[list[SpanInfo]] = [[] for _ in range(num_blocks)]
    for s in servers:
        for b in range(s.start, s.end):
            starting[b].append(s)
    by_id = {s.peer_id: s for s in servers}
    came: dict[tuple[int, str], tuple[int, str] | None] = {}
    heap: list[tuple[float, int, str, tuple[int, str] | None]] = [(0.0, 0, "", None)]
    while heap:
        cost, block, pid, prev = heapq.heappop(heap)
        if (block, pid) in came:
            continue
        came[(block, pid)] = prev
        if pid == "":
            if block == num_blocks:
                return _unwind(came, (block, pid))
            for s in starting[block]:
                if (block, s.peer_id) not in came:
                    heapq.heappush(heap, (cost + _ping(rtts, s), block, s.peer_id, (block, pid)))
            continue
        step = cost + 1 / max(by_id[pid].throughput, 1e-9)
        heapq.heappush(heap, (step, block + 1, "", (block, pid)))
        if block + 1 < by_id[pid].end:
            heapq.heappush(heap, (step, block + 1, pid, (block, pid)))
    return []


def _unwind(came: dict[tuple[int, str], tuple[int, str] | None], node: tuple[int, str]) -> list[tuple[str, int, int]]:
    blocks: list[tuple[int, str]] = []
    current: tuple[int, str] | None = node
    while current is not None:
        if current[1]:
            blocks.append(current)
        current = came[current]
    chain: list[tuple[str, int, int]] = []
    for b, p in reversed(blocks):
        if chain and chain[-1][0] == p and chain[-1][2] == b:
            chain[-1] = (p, chain[-1][1], b + 1)
        else:
            chain.append((p, b, b + 1))
    return chain


def _ping(rtts: Mapping[str, PeerView], info: SpanInfo) -> float:
    view = rtts.get(info.peer_id)
    return view.rtt if view is not None and view.rtt is not None else 0.01
