"""A discrete-event simulation of a swarm: peers join, announce, rebalance and leave; users send chat requests
whose sessions are routed, prefilled, decoded and failed over. Only clocks, the DHT and the network are simulated;
every placement and routing decision is the policy's (for `Ours`: the shipped code).

Execution model (the same for every policy but in how its servers step sessions and hold KV):
- A peer's work for one token of each of its n sessions, per block: 1/true_throughput + (n − 1) × its batching
  marginal where the policy's servers batch sessions' decode steps into one forward (ours), n/true_throughput
  where they run them one after another (Petals: its inference task pool "does *not* combine incoming requests
  into batches"). A session's token takes the longer of its chain's time alone (network + each link's blocks at
  1/true_throughput) and its busiest link's work for all that link's sessions (the bound of a closed queueing
  network: kind to both where a peer is near saturation, where queues add to it). `saturated=True`: the sum of
  the network and every link's work for all its sessions (every session waits for all the others on each
  link; this simulator's model until session 41, 2026-12-04: harsh to both, to one-at-a-time servers most). A prompt is
  prefilled at 40× (GPUs) or 4× (CPUs) the decode rate per token.
- `push` (both real systems' default): a token goes from the client to the chain's first peer, from peer to peer,
  and from the last back to the client: half the round trip of each of those legs, plus every link's blocks × its
  step. Peers measure the round trips to peers that may follow them and announce them, which routes count
  (`SpanInfo.next_rtt`): ours probe up to 16 such peers and announce the 4 nearest; Petals 2.2 pings up to 5 at
  random and announces them (`next_pings`; here 4, the record's cap). Measurements are renewed every 30 s. Petals'
  own route search (a Dijkstra whose unmeasured hops cost 0.15 s one way and whose chains switch peers only at a
  span's end) is approximated by the same search as ours over its load-free records, which prices an unmeasured
  hop as the return through the client and may switch anywhere: if anything, kinder to Petals.
- relay (`push=False`): per link, the client's RTT to the peer plus the link's blocks × its step (the client relays
  every hop).
- The DHT holds each peer's last record until it expires; placement reads the live records; each user's client
  routes over its own last read of them, read again when a route needs it and the last read is a
  `client_refresh` period old (stale records included: a departed peer stays routable until its record expires or
  a client finds it dead).
- KV: each request carries its client's answer cap (`Request.max_tokens`); a route needs room for prompt + cap
  (both real clients route by that max_length), and a peer holds what the policy reserves (`kv_tokens`: ours as the
  cache grows, in 128-token chunks, checked once a tick; Petals the whole max_length from the open). A session
  that cannot grow waits on that peer up to ADMISSION_WAIT_S, then the peer refuses it and that link is replaced.
- A route through a peer that is gone costs the client 5 s (a crashed host: connect timeout) or one RTT (it shut
  down, or moved, or has no KV left: it answers); the client then avoids it for 60 s and routes again. A session
  whose peer leaves waits the same detection time, then routes a replacement for that link and replays its
  context through it. A moving peer drops its sessions (they fail over) and is offline while it loads: blocks it
  had 0.5 s each, new ones at its bandwidth.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from benchmarks.sim.world import DISK_SECONDS_PER_BLOCK, NUM_BLOCKS, Host, PeerSpec, Request, World, rtt_s
from swarm.client.routing import Link, PeerView, SpanTable
from swarm.protocol import MAX_NEXT_RTT, NoChainError, PeerState, SpanInfo
from swarm.server.backend import Limits

DETECT_CRASH_S = 5.0
AVOID_S = 60.0
TICK_S = 1.0
PREFILL_GAIN = {"cpu": 4.0}  # others 40
HOPS_EVERY_S = 30.0  # a peer renews its measurements of the peers that may follow it
PROBED = {"ours": 16, "petals": MAX_NEXT_RTT}  # peers that may follow, measured; ours announce the nearest 4
ADMISSION_WAIT_S = Limits().admission_wait  # a peer that cannot grow a session's KV makes it wait, then refuses
MAX_BATCH_SESSIONS = Limits().max_batch_sessions  # decode steps one forward of ours takes


@dataclass
class Peer:
    spec: PeerSpec
    state: str = PeerState.JOINING
    start: int = 0
    end: int = 0
    epoch: int = 0  # bumped on every transition, so that events scheduled before it are ignored
    sessions: set[int] = field(default_factory=set)
    reserved: int = 0  # KV tokens reserved by its sessions
    held: dict[int, int] = field(default_factory=dict)  # session → its KV tokens here
    moves: int = 0

    def step_s(self, batches: bool = True) -> float:
        """Seconds of one block's step with every session here stepping: batched (forwards of up to
        MAX_BATCH_SESSIONS) or one session after another."""
        n = max(1, len(self.sessions))
        if not batches:
            return n / self.spec.true
        forwards = -(-n // MAX_BATCH_SESSIONS)
        return forwards / self.spec.true + (n - forwards) * self.spec.marginal_s()

    def prefill_s(self, tokens: int) -> float:
        return tokens / (self.spec.true * PREFILL_GAIN.get(self.spec.kind.name, 40.0))


@dataclass
class Session:
    sid: int
    user: int
    number: int
    req: Request
    began: float
    links: list[list[Any]] = field(default_factory=list)  # [peer_id, start, end]
    ready_at: float = 0.0  # busy (routing, prefill, replay, failure detection) until then
    generated: float = 0.0
    first_token: float | None = None
    broken: list[int] = field(default_factory=list)  # indices of links to replace
    last_progress: float = 0.0
    kv_wait_since: float | None = None  # when a peer of its chain first could not grow its KV

    @property
    def context(self) -> int:
        return self.req.prompt + int(self.generated)

    @property
    def max_length(self) -> int:
        return self.req.prompt + self.req.max_tokens


class Simulation:
    def __init__(self, world: World, policy: Any, duration_s: float, warmup_s: float, push: bool = False,
                 saturated: bool = False):
        self.world, self.policy, self.push, self.saturated = world, policy, push, saturated
        self.hops: dict[str, tuple[float, int, tuple[tuple[str, float], ...]]] = {}  # peer → (when, end, next_rtt)
        self.hop_rng = random.Random(f"{world.seed}/hops")
        self.pair_rtt: dict[tuple[str, str], float] = {}
        self.duration, self.warmup = duration_s, warmup_s
        self.now = 0.0
        self.events: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.peers: dict[str, Peer] = {}
        self.dht: dict[str, tuple[SpanInfo, float]] = {}
        self.sessions: dict[int, Session] = {}
        self.sid = itertools.count()
        self.avoid: dict[int, dict[str, float]] = defaultdict(dict)  # user → peer → until
        self.coverage = np.zeros(NUM_BLOCKS, dtype=np.int64)  # online peers per block (the truth)
        self.hole_s = np.zeros(NUM_BLOCKS)
        self._placement_view: tuple[float, list[SpanInfo]] = (-1.0, [])
        self._placement_entries = 0
        self._latest: tuple[float, SpanTable] = (-math.inf, SpanTable([]))  # the last read's time and records
        self._user_views: dict[int, tuple[float, SpanTable]] = {}  # user → its client's last read
        self._counted_read = -math.inf
        self.rtt_cache: dict[tuple[int, str], float] = {}
        self.hosts = {spec.peer_id: spec.host for spec in world.peers}
        self.view_cache: dict[int, dict[str, PeerView]] = {}
        self.stats: dict[str, Any] = defaultdict(float)
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.route_wall: list[float] = []
        self.timeline: list[tuple[float, float]] = []  # (time, tokens in the last minute)
        self.carrying: list[tuple[int, int, int]] = []  # a minute's peers with sessions, datacenter ones, online ones
        self._minute_tokens = 0.0
        self.record_bytes = len(msgpack.packb(_as_on_the_wire(self._record(_dummy_peer())).to_dict()))

    # -- events -----------------------------------------------------------------------------------------------------

    def at(self, t: float, kind: str, payload: Any = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, payload))

    def run(self) -> dict[str, Any]:
        for spec in self.world.peers:
            self.at(spec.arrive_s, "arrive", spec)
        for t, region, share in self.world.region_failures:
            self.at(t, "region_failure", (region, share))
        for user in range(len(self.world.users)):
            self.at(self.world.think(user, 0), "request", (user, 0))
        self.at(TICK_S, "tick")
        self.at(60.0, "minute")
        began = time.perf_counter()
        while self.events:
            t, _, kind, payload = heapq.heappop(self.events)
            if t > self.duration:
                break
            self.now = t
            getattr(self, f"_on_{kind}")(payload)
        self.stats["wall_s"] = time.perf_counter() - began
        return self.report()

    def _on_arrive(self, spec: PeerSpec) -> None:
        peer = Peer(spec)
        self.peers[spec.peer_id] = peer
        start, end = self.policy.join(self._placement_read(), spec.peer_id, spec.length, NUM_BLOCKS)
        self._load(peer, start, end, DISK_SECONDS_PER_BLOCK * (end - start))
        self.at(self.now + spec.stay_s, "leave", (spec.peer_id, None))
        self.at(self.now + self.policy.announce_s * self.world_jitter(spec), "announce", (spec.peer_id, 0))
        self.at(self.now + self.policy.rebalance_every(len(self.dht)) * (0.8 + 0.4 * self.world_jitter(spec)),
                "rebalance", spec.peer_id)

    def world_jitter(self, spec: PeerSpec) -> float:
        return (int(spec.peer_id[:4], 16) % 1000) / 1000

    def _load(self, peer: Peer, start: int, end: int, seconds: float) -> None:
        """The peer loads blocks [start, end) (joining or moving) and goes online after `seconds`."""
        self._set_online(peer, False)
        peer.state, peer.start, peer.end = PeerState.JOINING, start, end
        peer.epoch += 1
        self._announce(peer)
        self.at(self.now + seconds, "online", (peer.spec.peer_id, peer.epoch))

    def _on_online(self, payload: tuple[str, int]) -> None:
        peer = self.peers.get(payload[0])
        if peer is None or peer.epoch != payload[1] or peer.state != PeerState.JOINING:
            return
        self._set_online(peer, True)
        peer.state = PeerState.ONLINE
        self._announce(peer)

    def _set_online(self, peer: Peer, online: bool) -> None:
        """Keep the block coverage true; call before the peer's state changes."""
        was = peer.state == PeerState.ONLINE
        if was and not online:
            self.coverage[peer.start : peer.end] -= 1
        elif online and not was:
            self.coverage[peer.start : peer.end] += 1

    def _on_announce(self, payload: tuple[str, int]) -> None:
        peer = self.peers.get(payload[0])
        if peer is None:
            return
        self._announce(peer)
        self.at(self.now + self.policy.announce_s, "announce", payload)

    def _announce(self, peer: Peer) -> None:
        if self.push:
            self._renew_hops(peer)
        self.dht[peer.spec.peer_id] = (self._record(peer), self.now + self.policy.ttl_s)
        self.stats["dht_write_bytes"] += self.record_bytes * self._writes_per_record(peer)

    def _writes_per_record(self, peer: Peer) -> int:
        return 1 if self.policy.name == "ours" else peer.end - peer.start  # Petals: one entry per block key

    def _record(self, peer: Peer) -> SpanInfo:
        spec = peer.spec
        load = len(peer.sessions) if self.policy.carries_load else 0
        target = (peer.start, peer.end) if peer.state == PeerState.JOINING else (0, 0)
        return SpanInfo(peer_id=spec.peer_id, model_id="m", start=peer.start, end=max(peer.end, peer.start + 1),
                        num_blocks=NUM_BLOCKS, hidden_size=8192, dtype="float16", quant="nf4", max_length=8192,
                        kv_budget_tokens=spec.kv_budget_tokens,
                        free_kv_tokens=max(0, spec.kv_budget_tokens - peer.reserved), active_sessions=load,
                        state=peer.state, throughput=spec.announced,
                        batch_throughput=spec.announced * spec.batch_gain if self.policy.carries_load else 0.0,
                        target_start=target[0], target_end=target[1], movable=True, updated_at=self.now,
                        push=self.push, next_rtt=self._next_rtt(peer) if self.push else ())

    def _next_rtt(self, peer: Peer) -> tuple[tuple[str, float], ...]:
        """The round trips `peer` announces: its last measurements, while it is online and serves the same end."""
        known = self.hops.get(peer.spec.peer_id)
        if peer.state != PeerState.ONLINE or known is None or known[1] != peer.end:
            return ()
        return known[2]

    def _renew_hops(self, peer: Peer) -> None:
        """Measure the round trips to peers that may follow `peer` (online, serving its end block) when the last
        measurement is HOPS_EVERY_S old or its span's end moved: ours the 4 nearest of up to 16 probed, Petals' up
        to 4 at random."""
        pid = peer.spec.peer_id
        known = self.hops.get(pid)
        if peer.state != PeerState.ONLINE or peer.end >= NUM_BLOCKS:
            return
        if known is not None and known[1] == peer.end and self.now - known[0] < HOPS_EVERY_S:
            return
        after = [p for p, other in self.peers.items() if other.state == PeerState.ONLINE and p != pid
                 and other.start <= peer.end < other.end]
        probed = self.hop_rng.sample(after, min(PROBED[self.policy.name], len(after)))
        measured = sorted((self._pair_rtt(pid, p), p) for p in probed)[:MAX_NEXT_RTT]
        self.hops[pid] = (self.now, peer.end, tuple((p, rtt) for rtt, p in measured))

    def _pair_rtt(self, a: str, b: str) -> float:
        key = (a, b) if a < b else (b, a)
        value = self.pair_rtt.get(key)
        if value is None:
            value = self.pair_rtt[key] = rtt_s(self.hosts[a], self.hosts[b])
        return value

    def _network_s(self, session: Session, links: list[list[Any]]) -> float:
        """Seconds on the network of one token through `links` (see the module: push or relay)."""
        if not self.push:
            return sum(self._rtt(session.user, pid) for pid, *_ in links)
        ids = [pid for pid, *_ in links]
        return (self._rtt(session.user, ids[0]) + self._rtt(session.user, ids[-1])
                + sum(self._pair_rtt(a, b) for a, b in itertools.pairwise(ids) if a != b)) / 2

    def _on_leave(self, payload: tuple[str, bool | None]) -> None:
        peer_id, abrupt = payload
        peer = self.peers.pop(peer_id, None)
        if peer is None:
            return
        abrupt = peer.spec.abrupt if abrupt is None else abrupt
        self._set_online(peer, False)
        if abrupt:  # its record stays until it expires
            self.stats["crashes"] += 1
        else:
            peer.state = PeerState.OFFLINE
            self.dht[peer_id] = (self._record(peer), self.now + self.policy.ttl_s)
            self.stats["dht_write_bytes"] += self.record_bytes
        self.stats["departures"] += 1
        self._drop_sessions(peer, DETECT_CRASH_S if abrupt else None)

    def _on_region_failure(self, payload: tuple[str, float]) -> None:
        region, share = payload
        hit = [p for p in self.peers.values() if p.spec.host.region == region]
        rng = np.random.default_rng(int(self.now))
        for peer in hit:
            if rng.random() < share:
                self._on_leave((peer.spec.peer_id, True))

    def _drop_sessions(self, peer: Peer, detect_s: float | None) -> None:
        """The peer's sessions lose their link through it: after the detection time they route a replacement."""
        for sid in list(peer.sessions):
            session = self.sessions.get(sid)
            if session is None:
                continue
            for i, link in enumerate(session.links):
                if link[0] == peer.spec.peer_id and i not in session.broken:
                    session.broken.append(i)
                    self._avoid(session.user, link[0])
            delay = detect_s if detect_s is not None else self._rtt(session.user, peer.spec.peer_id)
            session.ready_at = max(session.ready_at, self.now + delay)
        peer.sessions.clear()
        peer.held.clear()
        peer.reserved = 0

    def _on_rebalance(self, peer_id: str) -> None:
        peer = self.peers.get(peer_id)
        if peer is None:
            return
        self.at(self.now + self.policy.rebalance_every(len(self.dht)) * (0.8 + 0.4 * np.random.default_rng(
            (int(self.now * 1000), int(peer_id[:8], 16))).random()), "rebalance", peer_id)
        if peer.state != PeerState.ONLINE:
            return
        view = self._placement_read()
        me = self._record(peer)
        target = self.policy.move(view, me)
        if target is None:
            return
        self.stats["moves"] += 1
        peer.moves += 1
        self._drop_sessions(peer, None)
        held = max(0, min(peer.end, target[1]) - max(peer.start, target[0]))
        seconds = held * DISK_SECONDS_PER_BLOCK + peer.spec.download_s(target[1] - target[0] - held)
        self._load(peer, target[0], target[1], seconds)

    def _placement_read(self) -> list[SpanInfo]:
        """The live records, as a peer reading the DHT sees them (re-read at most once a simulated second)."""
        at, view = self._placement_view
        if self.now - at >= 1.0:
            view = [info for info, expires in self.dht.values() if expires > self.now]
            self._placement_view = (self.now, view)
            self._placement_entries = sum(map(self._entries, view))
            self._expire()
        self.stats["dht_read_bytes"] += self.record_bytes * self._placement_entries
        return view

    def _entries(self, info: SpanInfo) -> int:
        return 1 if self.policy.name == "ours" else max(1, info.end - info.start)

    def _expire(self) -> None:
        for peer_id in [p for p, (_, expires) in self.dht.items() if expires <= self.now]:
            del self.dht[peer_id]

    def _client_read(self, user: int) -> SpanTable:
        """A user's view: its client's last read of the records, as columns (as swarm.client.router's), read again
        when a route needs it and it is older than a `client_refresh` period. Users' clients start at different
        times, so their views are of different ages, up to a period: not one snapshot everybody routes by. The
        records are laid out at most once a tick (routes are taken on ticks) and shared by the users reading then."""
        read = self._user_views.get(user)
        period = self.policy.client_refresh(len(read[1]) if read is not None else len(self.dht))
        if read is None or self.now - read[0] >= period:
            if self._latest[0] < self.now:
                view = SpanTable(info for info, expires in self.dht.values() if expires > self.now and info.routable)
                self._latest = (self.now, view)
                # what one client reads: a read a period (the period of a read of every record now)
                if self.now - self._counted_read >= self.policy.client_refresh(len(view)):
                    self._counted_read = self.now
                    self.stats["client_refreshes"] += 1
                    self.stats["client_read_records"] += sum(map(self._entries, view.spans))
            read = self._user_views[user] = self._latest
        return read[1]

    # -- users and sessions -----------------------------------------------------------------------------------------

    def _on_request(self, payload: tuple[int, int]) -> None:
        user, number = payload
        session = Session(next(self.sid), user, number, self.world.request(user, number), self.now)
        session.broken = [-1]  # the whole chain is to be routed
        session.ready_at = self.now
        session.last_progress = self.now
        self.sessions[session.sid] = session

    def _on_minute(self, _: Any) -> None:
        self.timeline.append((self.now, self._minute_tokens / 60))
        if self.now > self.warmup:  # how many peers the routes use: all of them, or a few
            carrying = [p for p in self.peers.values() if p.sessions]
            self.carrying.append((len(carrying), sum(p.spec.kind.name == "datacenter" for p in carrying),
                                  sum(p.spec.kind.name == "datacenter" and p.state == PeerState.ONLINE
                                      for p in self.peers.values())))
        self._minute_tokens = 0.0
        self.at(self.now + 60.0, "minute")

    def _on_tick(self, _: Any) -> None:
        self.at(self.now + TICK_S, "tick")
        measuring = self.now > self.warmup
        self.stats["ticks"] += 1
        self.stats["peer_ticks"] += len(self.peers)
        if measuring:
            self.hole_s += (self.coverage == 0) * TICK_S
        for session in list(self.sessions.values()):
            if session.ready_at > self.now:
                continue
            if session.broken:
                self._repair(session)
                continue
            self._decode(session, measuring)

    def _decode(self, session: Session, measuring: bool) -> None:
        since = max(session.last_progress, session.ready_at)
        session.last_progress = self.now
        if not self._grow(session):
            return
        per_token = self._token_s(session)
        tokens = min((self.now - since) / per_token, session.req.output - session.generated)
        if session.first_token is None and tokens >= 1:
            session.first_token = since + per_token
        session.generated += tokens
        if measuring:
            self.stats["tokens"] += tokens
        self._minute_tokens += tokens
        self.stats["tokens_all"] += tokens
        if session.generated >= session.req.output - 1e-9:
            self._finish(session)

    def _token_s(self, session: Session) -> float:
        """Seconds a token of the session takes now (see the module: a peer's work, `saturated`)."""
        batches = self.policy.batches_sessions
        work = [(e - s) * self.peers[pid].step_s(batches) for pid, s, e in session.links]
        network = self._network_s(session, session.links)
        if self.saturated:
            return network + sum(work)
        alone = sum((e - s) / self.peers[pid].spec.true for pid, s, e in session.links)
        return max(network + alone, max(work))

    def _grow(self, session: Session) -> bool:
        """Make every peer of the chain hold the KV the session's context needs; False while one cannot (the
        session waits; after ADMISSION_WAIT_S that peer refuses it and the link is replaced)."""
        need = self.policy.kv_tokens(session.context, session.max_length)
        short = set()
        for pid in dict.fromkeys(pid for pid, *_ in session.links):  # a peer twice in a chain: one reservation
            peer = self.peers[pid]
            held = peer.held[session.sid]
            if need <= held:
                continue
            if peer.reserved - held + need <= peer.spec.kv_budget_tokens:
                peer.held[session.sid] = need
                peer.reserved += need - held
            else:
                short.add(pid)
        if not short:
            session.kv_wait_since = None
            return True
        if session.kv_wait_since is None:
            session.kv_wait_since = self.now
        elif self.now - session.kv_wait_since >= ADMISSION_WAIT_S:
            session.kv_wait_since = None
            self.stats["refused_kv_growth"] += 1
            for pid in short:
                self._detach(pid, session)
                self._avoid(session.user, pid)
            session.broken = [i for i, link in enumerate(session.links) if link[0] in short]
        return False

    def _finish(self, session: Session) -> None:
        done = session.ready_at + (self.now - session.ready_at)
        for pid, *_ in session.links:
            self._detach(pid, session)
        del self.sessions[session.sid]
        if session.began > self.warmup:
            self.latencies.append(done - session.began)
            self.ttfts.append((session.first_token or done) - session.began)
        self.at(self.now + self.world.think(session.user, session.number + 1), "request",
                (session.user, session.number + 1))

    def _detach(self, pid: str, session: Session) -> None:
        peer = self.peers.get(pid)
        if peer is not None and session.sid in peer.sessions:
            peer.sessions.discard(session.sid)
            peer.reserved -= peer.held.pop(session.sid)

    def _repair(self, session: Session) -> None:
        """Route the session's missing links (its whole chain at first) and attach them, or try again later."""
        if session.broken == [-1]:
            parts = [(0, NUM_BLOCKS)]
        else:
            parts = [(session.links[i][1], session.links[i][2]) for i in sorted(session.broken)]
        new_links: list[list[Any]] = []
        for start, end in parts:
            chain = self._route(session, start, end)
            if chain is None:
                return
            problem = self._check(chain, session)
            if problem is not None:
                pid, delay = problem
                self._avoid(session.user, pid)
                session.ready_at = self.now + delay
                self.stats["bad_routes"] += 1
                return
            new_links.extend([link.peer.peer_id, link.start, link.end] for link in chain)
        if session.broken == [-1]:
            session.links = new_links
            replay = session.context
        else:
            kept = [link for i, link in enumerate(session.links) if i not in session.broken]
            session.links = sorted(kept + new_links, key=lambda link: link[1])
            replay = session.context
            self.stats["failovers"] += 1
        whole = session.broken == [-1]
        session.broken = []
        # the prompt (or a replacement's replay) through the new links: pushed along a new chain, else each
        # replacement link from the client
        seconds = self._network_s(session, new_links) if whole else sum(self._rtt(session.user, pid)
                                                                       for pid, *_ in new_links)
        for pid, s, e in new_links:
            peer = self.peers[pid]
            if session.sid not in peer.sessions:  # a chain may pass through a peer twice: one reservation
                peer.sessions.add(session.sid)
                peer.held[session.sid] = self.policy.kv_tokens(replay, session.max_length)
                peer.reserved += peer.held[session.sid]
            seconds += (e - s) * peer.prefill_s(replay)
        session.ready_at = self.now + seconds
        session.last_progress = session.ready_at

    def _route(self, session: Session, start: int, end: int) -> list[Link] | None:
        view = self._client_read(session.user)
        avoid = {p for p, until in self.avoid[session.user].items() if until > self.now}
        rtts = _Rtts(self, session.user)
        began = time.perf_counter()
        try:
            chain = self.policy.route(view, rtts, NUM_BLOCKS, session.max_length, start, end, avoid, self.push)
        except NoChainError:
            chain = None
        self.route_wall.append(time.perf_counter() - began)
        if chain is None:
            session.ready_at = self.now + TICK_S
            self.stats["no_chain"] += 1
        return chain

    def _check(self, chain: list[Link], session: Session) -> tuple[str, float] | None:
        """What the chain's peers answer: None when all of them take the session, else (peer, seconds lost)."""
        need = self.policy.kv_tokens(session.context, session.max_length)
        for link in chain:
            pid = link.peer.peer_id
            peer = self.peers.get(pid)
            if peer is None:
                crashed = self._crashed(pid)
                self.stats["refused_crashed" if crashed else "refused_gone"] += 1
                return pid, DETECT_CRASH_S if crashed else self._rtt(session.user, pid)
            if peer.state != PeerState.ONLINE or not peer.start <= link.start < link.end <= peer.end:
                self.stats["refused_moved"] += 1
                return pid, self._rtt(session.user, pid)
            if peer.reserved - peer.held.get(session.sid, 0) + need > peer.spec.kv_budget_tokens:
                self.stats["refused_kv"] += 1
                return pid, self._rtt(session.user, pid)
        return None

    def _crashed(self, pid: str) -> bool:
        record = self.dht.get(pid)
        return record is not None and record[0].state != PeerState.OFFLINE

    def _avoid(self, user: int, pid: str) -> None:
        self.avoid[user][pid] = self.now + AVOID_S

    def _rtt(self, user: int, pid: str) -> float:
        key = (user, pid)
        value = self.rtt_cache.get(key)
        if value is None:  # departed peers keep their place: a client's last ping to them
            value = self.rtt_cache[key] = rtt_s(self.world.users[user], self.hosts[pid])
        return value

    # -- results ----------------------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        window = self.duration - self.warmup
        for session in self.sessions.values():  # unfinished requests count with the time they have waited so far
            if session.began > self.warmup:
                self.latencies.append(self.duration - session.began)
                self.ttfts.append((session.first_token or self.duration) - session.began)
        lat, ttft = np.array(self.latencies or [np.nan]), np.array(self.ttfts or [np.nan])
        route_ms = np.array(self.route_wall or [np.nan]) * 1000
        s = self.stats
        mean_peers = max(1.0, s["peer_ticks"] / max(1.0, s["ticks"]))
        return {
            "throughput_tok_s": round(s["tokens"] / window, 1),
            "tokens_all": round(s["tokens_all"], 1),  # answer tokens of the whole run, warm-up included
            "p50_latency_s": round(float(np.nanpercentile(lat, 50)), 2),
            "p90_latency_s": round(float(np.nanpercentile(lat, 90)), 2),
            "p99_latency_s": round(float(np.nanpercentile(lat, 99)), 2),
            "p50_ttft_s": round(float(np.nanpercentile(ttft, 50)), 2),
            "p90_ttft_s": round(float(np.nanpercentile(ttft, 90)), 2),
            "requests_measured": len(self.latencies),
            "requests_unfinished": sum(1 for x in self.sessions.values() if x.began > self.warmup),
            "hole_share_mean": round(float(self.hole_s.mean() / window), 4),
            "hole_share_worst_block": round(float(self.hole_s.max() / window), 4),
            "moves": int(s["moves"]),
            "departures": int(s["departures"]),
            "failovers": int(s["failovers"]),
            "bad_routes": int(s["bad_routes"]),
            "bad_routes_by_cause": {k: int(s[f"refused_{k}"]) for k in ("crashed", "gone", "moved", "kv",
                                                                             "kv_growth")},
            "no_chain_retries": int(s["no_chain"]),
            "route_ms_mean": round(float(np.nanmean(route_ms)), 3),
            "route_ms_p90": round(float(np.nanpercentile(route_ms, 90)), 3),
            "route_ms_per_token": round(float(np.nansum(route_ms)) / max(1.0, s["tokens_all"]), 4),
            "mean_peers": round(mean_peers, 1),
            "dht_peer_read_bytes_s": round(s["dht_read_bytes"] / self.duration / mean_peers, 1),
            "dht_peer_write_bytes_s": round(s["dht_write_bytes"] / self.duration / mean_peers, 1),
            "dht_client_read_bytes_s": round(s["client_read_records"] * self.record_bytes
                                             / self.duration, 1),
            "record_bytes": self.record_bytes,
            "timeline": [(round(t), round(x, 1)) for t, x in self.timeline],
            "latency_percentiles": [round(float(x), 2) for x in np.nanpercentile(lat, np.arange(101))],
            "peers_with_sessions": _span([c[0] for c in self.carrying]),  # min, max over the measured minutes
            "datacenter_with_sessions": _span([c[1] for c in self.carrying]),
            "datacenter_online": _span([c[2] for c in self.carrying]),
            "sim_wall_s": round(s["wall_s"], 1),
        }


class _Rtts:
    """PeerView per peer id for one user, computed when routing asks (a client's probed RTTs)."""

    def __init__(self, sim: Simulation, user: int):
        self.sim, self.user = sim, user
        self.known = sim.view_cache.setdefault(user, {})

    def get(self, peer_id: str, default: Any = None) -> PeerView:
        view = self.known.get(peer_id)
        if view is None:
            view = self.known[peer_id] = PeerView(rtt=self.sim._rtt(self.user, peer_id))
        return view


def _span(values: list[int]) -> list[int]:
    return [min(values), max(values)] if values else []


def _as_on_the_wire(record: SpanInfo) -> SpanInfo:
    """A simulated peer's record at the size a real one has (the simulator's short ids and fields otherwise left
    out: a 46-character peer id, the content id, 4 measured hops), for counting DHT bytes."""
    peer_id = "Qm" + "x" * 44
    return dataclasses.replace(record, peer_id=peer_id, content_id="sha256:" + "0" * 64, push=True,
                               next_rtt=tuple((peer_id[:-1] + str(i), 0.0123) for i in range(MAX_NEXT_RTT)))


def _dummy_peer() -> Peer:
    from benchmarks.sim.world import KINDS
    return Peer(PeerSpec("f" * 16, KINDS[0], Host("europe", 1), 1000.0, 1000.0, 6.0, 20, 100.0, 16384, 0, 1, False),
                start=0, end=20)
