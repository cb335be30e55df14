"""What this client has seen of each peer: failures (bans with backoff), refusals, round trips, decode speed, and the
sessions it has open through it. Pure bookkeeping with an injected clock; `swarm.client.router` owns one.

    health = PeerHealth()
    health.report("Qm...", Outcome.FAILED)   # banned 15 s; the next failure after that ban, 30 s; ... up to 10 min
    health.view("Qm...")                     # PeerView for route search: RTT, own sessions, observed speed
    health.view_columns(table)               # the same for every span of a SpanTable at once (numpy arrays)

Outcomes a session or a probe reports:
- FAILED: an error reply, a lost connection, a timeout, a malformed or non-finite answer, a failed probe. The peer is
  banned; a failure while it is banned does not lengthen the ban (sixteen sessions failing on one dead peer are one
  episode), the first failure after a ban doubles the next one.
- REFUSED: the peer is full (capacity). Not its fault: routed around for REFUSAL_SECONDS, long enough for the view's
  next refresh to show its free KV, without a ban.
- MOVED: the peer left the blocks it was asked for. Nothing is recorded against the peer; the router re-reads the
  swarm before its next route, where the peer's record shows where it went.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from swarm.client.routing import PeerView, SpanTable

RTT_SMOOTHING = 0.3  # weight of a new RTT sample
STEP_SMOOTHING = 0.1  # weight of a new decode-step sample
OBSERVATION_TTL = 60.0  # seconds a peer's observed step time counts without new samples
# A peer whose decode steps are this much slower than its announced throughput implies (after OVERCLAIM_SAMPLES
# steps, beyond OVERCLAIM_SLACK seconds per block of noise) overstates its speed: for OVERCLAIM_SECONDS its observed
# time counts double and does not expire, so the claim cannot win its routing share back.
OVERCLAIM_FACTOR = 3.0
OVERCLAIM_SLACK = 0.002
OVERCLAIM_SAMPLES = 3
OVERCLAIM_SECONDS = 600.0


class Outcome(StrEnum):
    FAILED = "failed"
    REFUSED = "refused"
    MOVED = "moved"


@dataclass
class _Peer:
    banned_until: float = 0.0
    ban_length: float = 0.0  # the last ban's length: the next one lasts twice as long
    refused_until: float = 0.0
    rtt: float | None = None  # smoothed probe round trip (s)
    step: float | None = None  # smoothed decode step per block as this client saw it (s), RTT taken out
    step_seen: float = 0.0  # when `step` last had a sample
    samples: int = 0  # decode-step samples of `step`
    checks_passed: int = 0  # its answers re-computed on another replica that matched (swarm.client.verification)
    overclaimed_until: float = 0.0  # it announced much more speed than its steps showed (see OVERCLAIM_*)
    sessions: int = 0  # sessions this client has open through the peer now
    counted: int = 0  # `sessions` when the peer's record was last read (the record's load includes those)


class PeerHealth:
    BAN_SECONDS = 15.0
    MAX_BAN_SECONDS = 600.0
    REFUSAL_SECONDS = 5.0

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._peers: dict[str, _Peer] = {}
        # What a view reads of each peer, also kept as columns (one per peer, by slot; see `view_columns`):
        # rtt (nan: not probed), sessions − counted, step (nan: none), step_seen, overclaimed_until.
        self._slots: dict[str, int] = {}
        self._columns = np.zeros((5, 64))
        self._table_slots: tuple[SpanTable, int, np.ndarray] | None = None  # the last table's rows → slots
        self._reported: set[str] = set()  # peers ever banned or refused (of thousands known, the few to look at)

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _Peer()
        return peer

    def _sync(self, peer_id: str, peer: _Peer) -> None:
        """Copy what a view reads of `peer` into its column (every change to those fields ends here)."""
        slot = self._slots.get(peer_id)
        if slot is None:
            slot = self._slots[peer_id] = len(self._slots)
            if slot == self._columns.shape[1]:
                self._columns = np.concatenate((self._columns, np.zeros_like(self._columns)), axis=1)
        self._columns[:, slot] = (math.nan if peer.rtt is None else peer.rtt, peer.sessions - peer.counted,
                                  math.nan if peer.step is None else peer.step, peer.step_seen,
                                  peer.overclaimed_until)

    # -- outcomes ---------------------------------------------------------------------------------------------------

    def report(self, peer_id: str, outcome: Outcome) -> None:
        peer, now = self._peer(peer_id), self.clock()
        if outcome in (Outcome.FAILED, Outcome.REFUSED):
            self._reported.add(peer_id)
        if outcome == Outcome.FAILED and peer.banned_until <= now:
            peer.ban_length = min(2 * peer.ban_length if peer.ban_length else self.BAN_SECONDS, self.MAX_BAN_SECONDS)
            peer.banned_until = now + peer.ban_length
        elif outcome == Outcome.REFUSED:
            peer.refused_until = now + self.REFUSAL_SECONDS

    def banned(self) -> set[str]:
        """Peers that failed lately: avoided, but used when nobody else serves their blocks."""
        now = self.clock()
        return {peer_id for peer_id in self._reported if self._peers[peer_id].banned_until > now}

    def refused(self) -> set[str]:
        """Peers that refused a session for capacity lately: avoided."""
        now = self.clock()
        return {peer_id for peer_id in self._reported if self._peers[peer_id].refused_until > now}

    def ban_left(self, peer_id: str) -> float:
        peer = self._peers.get(peer_id)
        return max(0.0, peer.banned_until - self.clock()) if peer else 0.0

    # -- measurements -----------------------------------------------------------------------------------------------

    def rtt_sample(self, peer_id: str, seconds: float) -> None:
        peer = self._peer(peer_id)
        peer.rtt = seconds if peer.rtt is None else (1 - RTT_SMOOTHING) * peer.rtt + RTT_SMOOTHING * seconds
        self._sync(peer_id, peer)

    def rtt(self, peer_id: str) -> float | None:
        peer = self._peers.get(peer_id)
        return peer.rtt if peer else None

    def step_sample(self, peer_id: str, blocks: int, seconds: float, claimed: float | None = None) -> None:
        """A one-row decode step of this client took `seconds` over `blocks` blocks of the peer, which claims
        `claimed` seconds per block (from its announced throughput; None: unknown)."""
        peer = self._peer(peer_id)
        per_block = max(0.0, seconds - (peer.rtt or 0.0)) / max(1, blocks)
        old = None if peer.step is None or self.clock() - peer.step_seen > OBSERVATION_TTL else peer.step
        peer.step = per_block if old is None else (1 - STEP_SMOOTHING) * old + STEP_SMOOTHING * per_block
        peer.samples = 1 if old is None else peer.samples + 1
        peer.step_seen = self.clock()
        if (claimed is not None and peer.samples >= OVERCLAIM_SAMPLES
                and peer.step > OVERCLAIM_FACTOR * claimed + OVERCLAIM_SLACK):
            peer.overclaimed_until = self.clock() + OVERCLAIM_SECONDS
        self._sync(peer_id, peer)

    def overclaimed(self) -> set[str]:
        now = self.clock()
        return {peer_id for peer_id, peer in self._peers.items() if peer.overclaimed_until > now}

    def _observed(self, peer: _Peer) -> float | None:
        if peer.step is None:
            return None
        if peer.overclaimed_until > self.clock():
            return 2 * peer.step  # a peer caught overstating its speed: what it did counts, doubled, until then
        if self.clock() - peer.step_seen > OBSERVATION_TTL:
            return None  # not seen lately (routing went elsewhere): the announcement counts again
        return peer.step

    # -- verification of its answers on another replica (swarm.client.verification) ------------------------------

    def verify_due(self, peer_id: str, rate: float, warmup: int, draw: float) -> bool:
        """Whether this step of the peer is checked: always until it passed `warmup` checks, then with probability
        1 / (1 + checks passed), at least `rate`; `draw` is uniform in [0, 1). rate 0: never."""
        if rate <= 0:
            return False
        passed = self.passed(peer_id)
        return passed < warmup or draw < max(rate, 1.0 / (1 + passed))

    def check_passed(self, peer_id: str) -> None:
        self._peer(peer_id).checks_passed += 1

    def passed(self, peer_id: str) -> int:
        """Checks of this peer's answers passed so far."""
        peer = self._peers.get(peer_id)
        return peer.checks_passed if peer else 0

    def passed_checks(self) -> dict[str, int]:
        """Peer id → checks of its answers passed so far (its record with this client)."""
        return {peer_id: peer.checks_passed for peer_id, peer in self._peers.items() if peer.checks_passed}

    # -- this client's own load -------------------------------------------------------------------------------------

    def opened(self, peer_ids: Iterable[str]) -> None:
        for peer_id in peer_ids:
            peer = self._peer(peer_id)
            peer.sessions += 1
            self._sync(peer_id, peer)

    def closed(self, peer_ids: Iterable[str]) -> None:
        for peer_id in peer_ids:
            peer = self._peer(peer_id)
            peer.sessions = max(0, peer.sessions - 1)
            self._sync(peer_id, peer)

    def sessions(self, peer_id: str) -> int:
        peer = self._peers.get(peer_id)
        return peer.sessions if peer else 0

    def own_sessions(self) -> dict[str, int]:
        """Sessions open through each peer now (a snapshot to pass to records_read once records are read)."""
        return {peer_id: peer.sessions for peer_id, peer in self._peers.items() if peer.sessions}

    def records_read(self, peer_ids: Iterable[str], snapshot: dict[str, int]) -> None:
        """The peers' records were read after `snapshot` was taken: the load they state includes those sessions."""
        for peer_id in peer_ids:
            peer, counted = self._peers.get(peer_id), snapshot.get(peer_id, 0)
            if peer is not None or counted:  # (a peer without an entry counts 0 already)
                peer = self._peer(peer_id)
                peer.counted = counted
                self._sync(peer_id, peer)

    def known_peers(self) -> list[str]:
        """Peers this client has a record of (probed, used, checked or banned)."""
        return list(self._peers)

    def view(self, peer_id: str) -> PeerView:
        return self.get(peer_id) or PeerView()

    def get(self, peer_id: str, default: PeerView | None = None) -> PeerView | None:
        """The peer's view; `default` for a peer this client knows nothing of (as a Mapping of views would)."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return default
        return PeerView(peer.rtt, peer.sessions - peer.counted, self._observed(peer))

    def view_columns(self, table: SpanTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The views of every span in `table` at once, as `view` gives them one by one: (RTT, nan where not probed;
        extra sessions; observed seconds per block, nan where none counts). A route search over thousands of
        peers reads these instead of a PeerView per peer."""
        cached = self._table_slots
        if cached is None or cached[0] is not table or cached[1] != len(self._slots):  # rows → slots, once a table
            slots = np.fromiter(map(self._slots.get, table.peer_ids, itertools.repeat(-1)), np.int64, len(table))
            self._table_slots = cached = (table, len(self._slots), slots)
        slots = cached[2]
        known = slots >= 0
        rtt, extra, step, seen, overclaimed = np.where(known, self._columns[:, np.maximum(slots, 0)], 0.0)
        rtt[~known], step[~known] = math.nan, math.nan
        now = self.clock()
        observed = np.where(overclaimed > now, 2 * step, np.where(now - seen > OBSERVATION_TTL, math.nan, step))
        return rtt, extra, observed
