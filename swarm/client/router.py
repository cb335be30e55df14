"""The client's one owner of routing: the view of the swarm, each peer's health, and the choice of routes.

    router = Router(dht, p2p, model_id, num_blocks)
    chain = await router.route(length=512)                  # the fastest chain over every block, now
    router.report(peer_id, Outcome.FAILED)                  # what a session or a probe saw of a peer
    chain = await router.route(10, 20, replacing=True)      # a replacement for blocks 10:20 of a chain

The view is refreshed in the background every `period` seconds, never on the token path (in a large swarm the DHT
is re-read less often, so that reading every record costs at most swarm.dht.READ_BUDGET bytes/s; the refreshes
between two reads probe the peers of the last one): the model's span records
from the DHT, then an info probe of the routable peers, concurrently (at most `max_probes` per refresh, taking turns
in a large swarm; peers this client has sessions through first). A probe answers with the peer's current record
(fresher than the DHT's: load, free KV) and its duration is an RTT sample. A peer that fails its probe is reported
FAILED and keeps its DHT record until the record runs out.

Health (`swarm.client.health`) says which peers failed lately (banned with backoff), refused for capacity, how fast
their decode steps really were, and how many sessions this client has open through each (so that sessions opened
between two probes see each other). `route` runs the shortest-path search of `swarm.client.routing` over the view
with that health: refusing peers are left out; banned ones are left out too, except that a new session takes a
suspect peer rather than no chain at all, while a replacement for a failed link never goes back to a banned peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable

from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarm.client.health import Outcome, PeerHealth
from swarm.client.routing import Link, SpanTable, block_seconds, find_chain
from swarm.client.verification import VerificationPolicy
from swarm.codec import unpack_metadata
from swarm.dht import get_spans, read_period
from swarm.protocol import INFO_HANDLER, NoChainError, SpanInfo

logger = logging.getLogger(__name__)

LIVENESS_TIMEOUT = 1.5  # seconds a peer whose step is late has to answer a probe, at least


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


class Router:
    def __init__(self, dht: DHT | None, p2p: P2P | None, model_id: str, num_blocks: int, period: float = 3.0,
                 probe_timeout: float = 3.0, allowed_peers: set[str] | None = None, max_probes: int = 64,
                 clock: Callable[[], float] = time.monotonic, verification: VerificationPolicy | None = None,
                 rng: random.Random | None = None, content_id: str | None = None):
        self.dht, self.p2p, self.model_id, self.num_blocks = dht, p2p, model_id, num_blocks
        self.period, self.probe_timeout, self.max_probes = period, probe_timeout, max_probes
        self.clock = clock
        self.health = PeerHealth(clock)
        self._liveness: dict[str, asyncio.Future[bool]] = {}  # probes of late peers in flight (alive)
        self.verification = verification or VerificationPolicy()
        self.rng = rng or random.Random()
        self._allowed_peers = allowed_peers
        # the weights this client's model has (swarm.model.manifest); a peer announcing other weights under the same
        # model name is not routed through (one announcing none, from an older version, still is)
        self.content_id = content_id
        self._spans: list[SpanInfo] = []  # every peer of the model in the last refresh (allowed or not)
        self.updated: float | None = None  # clock() of the last refresh; None: re-read before the next route
        self._probed_at: dict[str, float] = {}
        self._read: list[SpanInfo] = []  # the records of the last DHT read, as read (not as probed since)
        self._read_at: float | None = None
        self._task: asyncio.Task | None = None
        self._refreshing: asyncio.Lock | None = None
        self._table: tuple[tuple, SpanTable] | None = None  # (what it was built from, `spans` as columns)
        # (blocks, peers avoided) → the refresh (its `_spans` list) in which no verifier route existed
        self._no_verifier: dict[tuple[int, int, frozenset[str]], list[SpanInfo]] = {}
        # the sessions routed here push from peer to peer (swarm.client.session): a route counts the hops between
        # peers that measured them (SpanInfo.next_rtt) instead of a return through this client
        self.push = False

    # -- the view ---------------------------------------------------------------------------------------------------

    @property
    def allowed_peers(self) -> set[str] | None:
        """Route only through these peer ids (None: any peer)."""
        return self._allowed_peers

    @allowed_peers.setter
    def allowed_peers(self, peers: set[str] | None) -> None:
        self._allowed_peers = peers
        self.updated = None  # the next route reads the swarm again, through the new filter

    @property
    def spans(self) -> list[SpanInfo]:
        """The last refresh's spans of the allowed peers. The allowlist applies when the view is read, not when it
        is refreshed: a refresh that began before the allowlist changed must not bring other peers into routes."""
        return self._allowed(self._spans)

    @spans.setter
    def spans(self, spans: list[SpanInfo]) -> None:
        self._spans = list(spans)

    @property
    def table(self) -> SpanTable:
        """`spans` as columns for the route searches (swarm.client.routing.SpanTable): built once per refresh (and
        allowlist), not once per route, since in a swarm of thousands of peers building it costs more than a
        search."""
        allowed = None if self._allowed_peers is None else frozenset(self._allowed_peers)  # (changed in place too)
        if (self._table is None or self._table[0][0] is not self._spans
                or self._table[0][1:] != (allowed, self.content_id)):
            self._table = ((self._spans, allowed, self.content_id), SpanTable(self.spans))
        return self._table[1]

    def _allowed(self, spans: list[SpanInfo]) -> list[SpanInfo]:
        allowed, mine = self._allowed_peers, self.content_id
        if mine:
            spans = [s for s in spans if not s.content_id or s.content_id == mine]
        return spans if allowed is None else [s for s in spans if s.peer_id in allowed]

    @property
    def dht_interval(self) -> float:
        """Seconds between the background refreshes' DHT reads: `period`, stretched in a large swarm so that reading
        every record costs at most swarm.dht.READ_BUDGET bytes/s; the refreshes between them probe the peers of
        the last read (their load and free KV stay fresh every `period`)."""
        return read_period(self.period, len(self._read))

    @property
    def stale(self) -> bool:
        return self.updated is None or self.clock() - self.updated > 2 * self.period

    def start(self) -> None:
        """Keep the view fresh in the background (from the first use on, in the running loop)."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._loop(), name="swarm-view")
            self._refreshing = None  # a lock belongs to the loop it was first awaited in

    async def _loop(self) -> None:
        while True:
            try:
                due = self._read_at is None or self.clock() - self._read_at >= self.dht_interval
                await self.refresh(read_dht=due)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a DHT hiccup: keep the last view, try again next period
                logger.warning("refreshing the swarm view failed: %r", e)
            await asyncio.sleep(self.period)

    async def current(self, fresh: bool = False, read_dht: bool = True) -> list[SpanInfo]:
        """The view's spans; `fresh` reads the DHT (unless `read_dht` is false: the records of the last read) and
        probes the peers now; a view older than two periods is always read again."""
        self.start()
        if self.stale:
            return await self.refresh()
        return await self.refresh(read_dht) if fresh else self.spans

    async def refresh(self, read_dht: bool = True) -> list[SpanInfo]:
        """Read the DHT (or, `read_dht` false, take the records of the last read) and probe the routable peers now
        (concurrent callers share one refresh)."""
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        if self._refreshing.locked():
            async with self._refreshing:  # someone else is refreshing: use theirs
                return self.spans
        async with self._refreshing:
            snapshot = self.health.own_sessions()
            if read_dht or self._read_at is None:
                self._read = await get_spans(self.dht, self.model_id, self.num_blocks)
                self._read_at = self.clock()
            spans = self._read
            chosen = self._to_probe(self._allowed(spans))
            probed = await asyncio.gather(*(self._probe(s) if s.peer_id in chosen else _none() for s in spans))
            self._spans = [fresh or s for s, fresh in zip(spans, probed, strict=True)]
            self.health.records_read([s.peer_id for s in self._spans], snapshot)
            self.updated = self.clock()
            return self.spans

    def _to_probe(self, spans: list[SpanInfo]) -> set[str]:
        """At most `max_probes` routable peers: those this client has sessions through, then the ones probed least
        recently (never-probed first); in a large swarm every peer still gets probed every few refreshes. Peers
        banned now are not probed: routes leave them out, and one that just failed by silence (a cut link) would hold
        the refresh of a failover up for the whole probe timeout."""
        banned = self.health.banned()
        routable = [s.peer_id for s in spans if s.routable and s.peer_id not in banned]
        if len(routable) <= self.max_probes:
            return set(routable)
        ranked = sorted(routable, key=lambda p: (self.health.sessions(p) == 0, self._probed_at.get(p, -1.0)))
        return set(ranked[: self.max_probes])

    async def _probe(self, span: SpanInfo) -> SpanInfo | None:
        if not span.routable:
            return None
        self._probed_at[span.peer_id] = self.clock()
        try:
            info, rtt = await probe(self.p2p, span.peer_id, self.probe_timeout)
        except Exception as e:
            logger.info("peer %s failed its probe: %r", span.peer_id, e)
            self.report(span.peer_id, Outcome.FAILED)
            return None
        if (info.model_id, info.num_blocks) != (span.model_id, span.num_blocks):  # its record said otherwise
            logger.info("peer %s answered its probe for another model or block count", span.peer_id)
            self.report(span.peer_id, Outcome.FAILED)
            return None
        self.health.rtt_sample(span.peer_id, rtt)
        return info

    async def alive(self, peer_id: str) -> bool:
        """Whether the peer answers a probe within max(1.5 s, 4 x its usual RTT) (a peer whose step is late: slow, or
        cut off?). Sessions asking about the same peer at once share one probe."""
        pending = self._liveness.get(peer_id)
        if pending is None:
            pending = self._liveness[peer_id] = asyncio.ensure_future(self._alive(peer_id))
            pending.add_done_callback(lambda _: self._liveness.pop(peer_id, None))
        return await asyncio.shield(pending)  # a session that stops waiting leaves the others their answer

    async def _alive(self, peer_id: str) -> bool:
        timeout = max(LIVENESS_TIMEOUT, 4 * (self.health.rtt(peer_id) or 0.0))
        try:
            await probe(self.p2p, peer_id, timeout)
        except Exception as e:  # unreachable, timed out, a bad answer: not alive as far as this session goes
            logger.info("peer %s did not answer a liveness probe within %.1f s (%r)", peer_id, timeout, e)
            return False
        return True

    async def peer_info(self, peer_id: str, timeout: float = 10.0) -> SpanInfo:
        """Ask a peer directly for its current record (free KV, active sessions), bypassing the DHT."""
        return (await probe(self.p2p, peer_id, timeout))[0]

    # -- health -----------------------------------------------------------------------------------------------------

    def report(self, peer_id: str, outcome: Outcome) -> None:
        """What a session or a probe saw of a peer (see swarm.client.health)."""
        self.health.report(peer_id, outcome)
        if outcome == Outcome.MOVED:
            self.updated = None  # its record says where it went: read it before the next route

    def observed(self, peer_id: str, blocks: int, seconds: float) -> None:
        """A one-row decode step of this client took `seconds` over `blocks` blocks of the peer."""
        record = next((s for s in self._spans if s.peer_id == peer_id), None)
        claimed = block_seconds(record, 0) if record is not None and record.throughput > 0 else None
        self.health.step_sample(peer_id, blocks, seconds, claimed)

    def opened(self, peer_ids: Iterable[str]) -> None:
        self.health.opened(peer_ids)

    def closed(self, peer_ids: Iterable[str]) -> None:
        self.health.closed(peer_ids)

    def banned(self) -> set[str]:
        return self.health.banned()

    def verify_due(self, peer_id: str) -> bool:
        """Whether a step just answered by this peer is to be checked on another replica (see verification)."""
        policy = self.verification
        return self.health.verify_due(peer_id, policy.rate, policy.warmup, self.rng.random())

    def check_passed(self, peer_id: str) -> None:
        self.health.check_passed(peer_id)

    def check_in_background(self, peer_id: str) -> bool:
        """Whether a due check of this peer's step may run beside the decoding (it has passed its warm-up checks)
        rather than before the step's output goes on (see verification)."""
        return self.verification.background and self.health.passed(peer_id) >= self.verification.warmup

    # -- routes -----------------------------------------------------------------------------------------------------

    async def route(self, start: int = 0, end: int | None = None, *, length: int = 0, batch: int = 1,
                    fresh: bool = False, replacing: bool = False, without: Iterable[str] = (),
                    push: bool | None = None) -> list[Link]:
        """The fastest chain over blocks [start, end) of peers that can hold a session of `batch` x `length` tokens.
        Peers that refused lately are left out. Banned peers are left out as well; for a new session (not
        `replacing` a failed link) a chain through them is taken when none exists without them. `without`: peers
        this route must not take whatever their health (a verification needs a replica other than the checked
        peer). `push`: the session pushes from peer to peer (None: as this router's sessions do, `self.push`)."""
        push = self.push if push is None else push
        # A failed link is replaced from the records of the last read, probed again now: a DHT read may wait out the
        # failed peer's own DHT node (a cut link answers nothing), seconds a live session would stall for. Only if
        # those records give no chain is the DHT read again.
        for reread in ((False, True) if replacing and fresh else (True,)):
            await self.current(fresh, read_dht=reread)
            table, views = self.table, self.health
            refused, banned = self.health.refused() | set(without), self.health.banned()
            try:
                return find_chain(table, self.model_id, self.num_blocks, refused | banned, start, end, views, length,
                                  batch, push)
            except NoChainError:
                if replacing:
                    if reread:
                        raise
                    continue
                if not banned - refused:
                    raise
                return find_chain(table, self.model_id, self.num_blocks, refused, start, end, views, length, batch,
                                  push)
        raise AssertionError("unreachable")

    async def verifier_route(self, start: int, end: int, *, length: int, batch: int, without: Iterable[str],
                             push: bool | None = None) -> list[Link] | None:
        """A chain over blocks [start, end) avoiding `without`, to check a step of theirs on (verification); None
        when there is none. That no other peer of the last refresh serves these blocks is kept until the next
        refresh (peers left out for a while, refused or banned, are asked again at the next check). Without that,
        where a span has one replica, every step of every session through it searched again: a step is due for a
        check at every step until its peer passed its warm-up checks, which with no other replica it never does (at
        16 chats through `make serve`'s one peer, ~17% of the gateway's event loop)."""
        key = (start, end, frozenset(without))
        if self._no_verifier.get(key) is self._spans:
            return None
        try:
            return await self.route(start, end, length=length, batch=batch, replacing=True, without=key[2],
                                    push=push)
        except NoChainError:
            pass
        try:  # none now: is that the swarm (remembered), or peers avoided for a while (refused, banned: not)?
            find_chain(self.table, self.model_id, self.num_blocks, set(key[2]), start, end, self.health, length,
                       batch, self.push if push is None else push)
        except NoChainError:
            if len(self._no_verifier) >= 256:  # old refreshes' answers
                self._no_verifier.clear()
            self._no_verifier[key] = self._spans
        return None

    async def missing_blocks(self, fresh: bool = False) -> list[tuple[int, int]]:
        """Blocks no live peer serves now ([] when a complete chain exists)."""
        try:
            await self.route(fresh=fresh)
            return []
        except NoChainError as e:
            return e.missing

    async def wait_for_chain(self, timeout: float = 60.0, poll: float = 0.2) -> list[Link]:
        """Poll the DHT until live peers cover every block; NoChainError after `timeout` seconds."""
        deadline = self.clock() + timeout
        while True:
            try:
                return await self.route(fresh=True)
            except NoChainError:
                if self.clock() > deadline:
                    raise
            await asyncio.sleep(poll)

    async def close(self) -> None:
        for pending in list(self._liveness.values()):
            pending.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def _none() -> None:
    return None
