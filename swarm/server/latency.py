"""A peer's round trips to the peers that may come after it in a chain: measured, and announced in its record.

With server-to-server push (swarm.server.push) a token's trip through a chain costs the client's half round trip to
the first peer and from the last, plus one hop between each two consecutive peers, which the client cannot see.
So each peer measures those hops itself: every round it takes the routable peers that take pushes and could follow
it in a chain (their span holds the block after its last one: start <= its end < end), probes up to
PROBES_PER_ROUND of them (least recently probed first) with the info RPC, and keeps each one's lowest round trip of
its last SAMPLES (the least queueing; a peer's first probe, which opens the connection, is not counted). Its record
(`SpanInfo.next_rtt`) carries the MAX_NEXT_RTT lowest of those measured within FRESH_FOR seconds; routes with push
(swarm.client.routing) count the hop where a record names it.

Bounded: MAX_KNOWN peers followed (the slowest gives its place to a new one, one a round), PROBES_PER_ROUND probes a
round, each within PROBE_TIMEOUT; a probe that fails counts nothing (a peer that is down is not next for long; its
old figure goes stale). The peer's rounds come every PERIOD (SOON while some followed peer was never probed), both
stretched in a large swarm like every read of the records (swarm.dht.read_period).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable

from swarm.protocol import MAX_NEXT_RTT, SpanInfo

PERIOD = 10.0  # seconds between rounds (stretched in a large swarm, as every reader of the records: swarm.dht)
SOON = 2.0  # seconds to the next round while some candidate was never probed
PROBES_PER_ROUND = 4
PROBE_TIMEOUT = 2.0  # seconds
SAMPLES = 3  # the lowest of a peer's last SAMPLES round trips counts
MAX_KNOWN = 64
FRESH_FOR = 300.0  # seconds a measurement is announced for


class NextHops:
    def __init__(self, probe: Callable[[str], Awaitable[float]], clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None):
        """`probe(peer_id)`: one round trip to that peer in seconds (raises when it does not answer)."""
        self._probe, self.clock, self._rng = probe, clock, rng or random.Random()
        self._samples: dict[str, list[float]] = {}  # peer id → its last SAMPLES round trips
        self._measured: dict[str, float] = {}  # peer id → when its last sample came
        self._probed: dict[str, float] = {}  # the peers it follows → when last probed (-inf: not yet)

    @staticmethod
    def candidates(spans: Iterable[SpanInfo], me: SpanInfo) -> list[str]:
        """Peers that could follow `me` in a chain and take pushes from it."""
        return [s.peer_id for s in spans if s.peer_id != me.peer_id and s.routable and s.push
                and s.start <= me.end < s.end]

    async def measure(self, spans: Iterable[SpanInfo], me: SpanInfo) -> int:
        """One round: probe the next few of the peers it follows (never-probed first, then the least recently
        probed); how many of those are left never probed (the next round may come sooner).

        It follows at most MAX_KNOWN of the candidates: those it knows while they stay candidates, and new ones
        (at random) where there is room; once every one it follows was probed and others wait, the slowest (one
        that never answered first) gives its place to one of them each round, so a large swarm is explored
        without ever forgetting the best."""
        candidates = self.candidates(spans, me)
        self._forget(set(candidates))
        waiting = [peer for peer in candidates if peer not in self._probed]
        if len(self._probed) >= MAX_KNOWN and waiting and -math.inf not in self._probed.values():
            worst = max(self._probed, key=lambda peer: min(self._samples.get(peer, [math.inf])))
            for table in (self._samples, self._measured, self._probed):
                table.pop(worst, None)
        room = MAX_KNOWN - len(self._probed)
        for peer in self._rng.sample(waiting, min(room, len(waiting))):
            self._probed[peer] = -math.inf  # followed from now on, not probed yet
        chosen = sorted(self._probed, key=self._probed.__getitem__)[:PROBES_PER_ROUND]
        now = self.clock()
        for peer in chosen:
            self._probed[peer] = now
        rtts = await asyncio.gather(*(self._timed(peer) for peer in chosen))
        for peer, rtt in zip(chosen, rtts, strict=True):
            if rtt is not None:
                self._samples[peer] = [*self._samples.get(peer, [])[-(SAMPLES - 1):], rtt]
                self._measured[peer] = now
        return sum(when == -math.inf for when in self._probed.values())

    async def _timed(self, peer: str) -> float | None:
        try:
            if peer not in self._samples:  # the first probe opens the connection: handshakes, not the round trip
                await asyncio.wait_for(self._probe(peer), PROBE_TIMEOUT)
            return await asyncio.wait_for(self._probe(peer), PROBE_TIMEOUT)
        except Exception:  # a peer that does not answer (or answers wrong) is measured by nothing
            return None

    def _forget(self, candidates: set[str]) -> None:
        """Drop peers that can no longer follow this one."""
        for table in (self._samples, self._measured, self._probed):
            for peer in [p for p in table if p not in candidates]:
                del table[peer]

    def announced(self) -> tuple[tuple[str, float], ...]:
        """What the record carries: the MAX_NEXT_RTT lowest round trips measured within FRESH_FOR seconds."""
        now = self.clock()
        fresh = [(peer, round(min(samples), 4)) for peer, samples in self._samples.items()
                 if now - self._measured[peer] <= FRESH_FOR]
        return tuple(sorted(fresh, key=lambda pair: (pair[1], pair[0]))[:MAX_NEXT_RTT])
