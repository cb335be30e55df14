"""The client's background view of the swarm, so that choosing a route never waits on the network.

Every `period` seconds: read the model's span records from the DHT, then probe the routable peers with the info
RPC, concurrently (at most `max_probes` per refresh, taking turns in a large swarm). A probe answers with the peer's
current record (fresher than the DHT's: load, free KV) and its duration is the peer's RTT sample (smoothed). A peer
that fails its probe is reported (the client bans it, with exponential backoff) and keeps its DHT record until the
ban or the record runs out.

The monitor also counts the sessions this client has open through each peer, so that sessions opened between two
probes see each other: the load a route search uses is the probed load, plus what this client opened since. And it
keeps how long each peer's decode steps took for this client's sessions (per block, RTT taken out), so that a peer
slower than it announces (overloaded, or lying) is routed by what it did, not by what it claims.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.client.routing import PeerView
from swarm.codec import unpack_metadata
from swarm.dht import get_spans
from swarm.protocol import INFO_HANDLER, SpanInfo

logger = logging.getLogger(__name__)

RTT_SMOOTHING = 0.3  # weight of a new RTT sample
STEP_SMOOTHING = 0.1  # weight of a new decode-step sample
OBSERVATION_TTL = 60.0  # seconds a peer's observed step time counts without new samples


async def _none() -> None:
    return None


async def probe(p2p: P2P, peer_id: str, timeout: float) -> tuple[SpanInfo, float]:
    """A peer's current record and the round trip it took (seconds); raises on timeout or a bad answer."""
    began = time.perf_counter()
    response = await asyncio.wait_for(
        p2p.call_protobuf_handler(PeerID.from_base58(peer_id), INFO_HANDLER, runtime_pb2.ExpertUID(),
                                  runtime_pb2.ExpertInfo),
        timeout,
    )
    rtt = time.perf_counter() - began
    info = SpanInfo.from_dict(unpack_metadata(response.serialized_info))
    if info.peer_id != peer_id:
        raise ValueError(f"peer {peer_id} answered with the record of {info.peer_id}")
    return info, rtt


class SwarmMonitor:
    def __init__(self, dht: DHT, p2p: P2P, model_id: str, period: float = 3.0, probe_timeout: float = 3.0,
                 allowed_peers: set[str] | None = None, on_failure: Callable[[str], None] | None = None,
                 max_probes: int = 64):
        self.dht, self.p2p, self.model_id = dht, p2p, model_id
        self.period, self.probe_timeout, self.max_probes = period, probe_timeout, max_probes
        self._probed_at: dict[str, float] = {}
        self.allowed_peers = allowed_peers
        self.on_failure = on_failure
        self._spans: list[SpanInfo] = []  # every peer of the model in the last refresh (allowed or not)
        self.updated: float | None = None  # monotonic time of the last refresh
        self.rtt: dict[str, float] = {}
        # per peer: smoothed decode step per block as this client saw it, and when last seen
        self.step_seconds: dict[str, tuple[float, float]] = {}
        self.own: Counter[str] = Counter()  # sessions this client has open through each peer now
        self._own_counted: dict[str, int] = {}  # own[peer] when the peer's record was taken
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Lock | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._loop(), name="swarm-monitor")
            self._refreshing = None  # a lock belongs to the loop it was first awaited in

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a DHT hiccup: keep the last view, try again next period
                logger.warning("refreshing the swarm view failed: %r", e)
            await asyncio.sleep(self.period)

    @property
    def stale(self) -> bool:
        return self.updated is None or time.monotonic() - self.updated > 2 * self.period

    async def refresh(self) -> list[SpanInfo]:
        """Read the DHT and probe the routable peers now (concurrent callers share one refresh)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        if self._refreshing.locked():
            async with self._refreshing:  # someone else is refreshing: use theirs
                return self.spans
        async with self._refreshing:
            spans = await get_spans(self.dht, self.model_id)
            own = dict(self.own)
            chosen = self._to_probe(self._allowed(spans))
            probed = await asyncio.gather(*(self._probe(s) if s.peer_id in chosen else _none() for s in spans))
            self._spans = [fresh or s for s, fresh in zip(spans, probed, strict=True)]
            self._own_counted = {s.peer_id: own.get(s.peer_id, 0) for s in self._spans}
            self.updated = time.monotonic()
            return self.spans

    @property
    def spans(self) -> list[SpanInfo]:
        """The last refresh's spans of the allowed peers. The allowlist applies when the view is read, not when it
        is refreshed: a refresh that began before the allowlist changed must not bring other peers into routes."""
        return self._allowed(self._spans)

    @spans.setter
    def spans(self, spans: list[SpanInfo]) -> None:
        self._spans = list(spans)

    def _allowed(self, spans: list[SpanInfo]) -> list[SpanInfo]:
        return spans if self.allowed_peers is None else [s for s in spans if s.peer_id in self.allowed_peers]

    def _to_probe(self, spans: list[SpanInfo]) -> set[str]:
        """At most `max_probes` routable peers: those this client has sessions through, then the ones probed least
        recently (never-probed first); in a large swarm every peer still gets probed every few refreshes."""
        routable = [s.peer_id for s in spans if s.routable]
        if len(routable) <= self.max_probes:
            return set(routable)
        ranked = sorted(routable, key=lambda p: (self.own.get(p, 0) == 0, self._probed_at.get(p, -1.0)))
        return set(ranked[: self.max_probes])

    async def _probe(self, span: SpanInfo) -> SpanInfo | None:
        if not span.routable:
            return None
        self._probed_at[span.peer_id] = time.monotonic()
        try:
            info, rtt = await probe(self.p2p, span.peer_id, self.probe_timeout)
        except Exception as e:
            logger.info("peer %s failed its probe: %r", span.peer_id, e)
            if self.on_failure is not None:
                self.on_failure(span.peer_id)
            return None
        old = self.rtt.get(span.peer_id)
        self.rtt[span.peer_id] = rtt if old is None else (1 - RTT_SMOOTHING) * old + RTT_SMOOTHING * rtt
        return info

    def views(self) -> dict[str, PeerView]:
        return {s.peer_id: PeerView(self.rtt.get(s.peer_id),
                                    self.own.get(s.peer_id, 0) - self._own_counted.get(s.peer_id, 0),
                                    self._observed(s.peer_id))
                for s in self._spans}

    def _observed(self, peer_id: str) -> float | None:
        seen = self.step_seconds.get(peer_id)
        if seen is None or time.monotonic() - seen[1] > OBSERVATION_TTL:
            return None  # not seen lately (routing went elsewhere): the announcement counts again
        return seen[0]

    def observed(self, peer_id: str, blocks: int, seconds: float) -> None:
        """A decode step of one of this client's sessions took `seconds` over `blocks` blocks of the peer."""
        per_block = max(0.0, seconds - self.rtt.get(peer_id, 0.0)) / max(1, blocks)
        old = self._observed(peer_id)
        smoothed = per_block if old is None else (1 - STEP_SMOOTHING) * old + STEP_SMOOTHING * per_block
        self.step_seconds[peer_id] = (smoothed, time.monotonic())

    def opened(self, peer_ids: Iterable[str]) -> None:
        self.own.update(peer_ids)

    def closed(self, peer_ids: Iterable[str]) -> None:
        self.own.subtract(peer_ids)
        self.own += Counter()  # drop zeros and negatives

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
