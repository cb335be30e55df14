"""The peer's compute: sessions over its span, each with its own KV cache, validated and run off the event loop.

All torch work happens on one dedicated thread, so the asyncio loop that serves the network never blocks and steps
of different sessions never run concurrently on the same weights. What runs there, in which order, is the
scheduler's choice (swarm.server.scheduler): rounds of decode steps and prefill chunks (of `prefill_chunk` tokens)
of one-row sessions, each round one forward where the span's family allows (`BlockSpan.forward_mixed`), and the
rest (steps of several rows, encoder inputs) between the rounds; so neither a burst of prompts stalls the decoding
sessions nor the reverse.

Each session belongs to a client (the remote peer id of its stream). Clients share the session slots and the KV
budget fairly (swarm.server.fairness): a client may use all of them while nobody else wants them, and is cut down to
its share, at the cost of its own longest-idle sessions, when another client needs room.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import torch

from swarm.model.segments import Segment
from swarm.model.span import BlockSpan, SpanKVCache
from swarm.protocol import ErrorCode, OpenRequest, PeerError
from swarm.server.fairness import FairShares, Holdings
from swarm.server.faults import Faults
from swarm.server.memory import KVBudget
from swarm.server.scheduler import Scheduler, SessionClosed, Step

T = TypeVar("T")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client may ask of this peer."""

    max_sessions: int = 64
    max_length: int = 8192
    max_batch: int = 8
    max_chunk_tokens: int = 2048  # new tokens in one step; a longer prefill is sent in several steps
    max_batch_sessions: int = 64  # decode steps of different sessions run together
    prefill_chunk: int = 128  # tokens of a prefill computed at once; decode batches run in between
    batch_wait: float = 0.02  # seconds the batcher may wait for the decoding sessions' next steps
    admission_wait: float = 5.0  # seconds a session may wait for KV budget (to open, or to grow) before a refusal

    @property
    def max_step_elements(self) -> int:
        return self.max_batch * self.max_chunk_tokens


@dataclass
class Session:
    key: str  # unique on this peer; the client's session_id is only a label
    session_id: str
    batch_size: int
    max_length: int
    blocks: slice  # within the span
    cache: SpanKVCache
    client: str = ""  # the remote peer id of its stream
    opened_at: float = field(default_factory=time.monotonic)
    last_step: float = field(default_factory=time.monotonic)  # when its last step arrived
    ended: PeerError | None = None  # why the peer ended this session (handed off, evicted), once it has
    idle_timer: asyncio.Timeout | None = None  # while the handler waits for (or reads) the session's next message
    in_frame: bool = False  # the handler is reading a frame of it (its timer is then the frame's deadline)
    push_key: str = ""  # steps may be pushed to it by the previous peer of its chain (swarm.server.push)
    handle: int = 0  # its name in its client's group frames (swarm.protocol), unique on this peer
    stepping: bool = False  # a step of it is in flight (from its own stream or a group frame: one at a time)
    copying: int = 0  # tokens a fork's copy queued for it will bring (0 once it has run)
    parked: bool = False  # its client kept it only for reuse and lets it go for room (swarm.protocol: park)

    @property
    def length(self) -> int:
        """The tokens its cache holds, or will hold once a fork's copy queued before its steps has run."""
        return max(self.cache.length, self.copying)


def bad_request(message: str) -> PeerError:
    return PeerError(message, ErrorCode.BAD_REQUEST)


class SpanBackend:
    def __init__(self, span: BlockSpan, limits: Limits, budget: KVBudget, faults: Faults | None = None):
        self.span = span
        self.faults = faults or Faults()
        self.draining: str | None = None  # why new sessions are refused (the peer is leaving this span)
        self.steps = 0  # forwards served
        self.last_step = 0.0  # monotonic time the last step arrived (a peer sending weights paces them lower after)
        self.limits = limits
        self.budget = budget
        self.sessions: dict[str, Session] = {}
        self.handles: dict[int, Session] = {}  # the same sessions by handle
        # sessions per (client, first block, end block), parked ones included: a group step's size is capped by its
        # client's count (each row of a group frame used to count them over every session here)
        self._per_client: collections.Counter[tuple[str, int, int]] = collections.Counter()
        self.shares = FairShares()
        self._keys = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute")
        self.scheduler = Scheduler(self._run_round, self.run, limits.max_batch_sessions, limits.batch_wait,
                                   limits.prefill_chunk, 4 * limits.max_sessions, lambda key: key in self.sessions)
        self._freed_waiters: list[asyncio.Future] = []  # sessions waiting for KV budget; resolved on every close

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on the compute thread now (the scheduler's jobs and batches go through here; so do start-up
        measurements, before the peer serves)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def drain(self, reason: str) -> None:
        """Refuse new sessions from now on (with MOVED and this reason); live ones go on until handed off."""
        self.draining = reason

    def open(self, request: OpenRequest, client: str = "") -> Session:
        """Validate an open request and reserve its KV; raises PeerError with a message for the client."""
        opened = self._try_open(request, client)
        if isinstance(opened, str):
            raise PeerError(opened, ErrorCode.CAPACITY)
        return opened

    async def admit(self, request: OpenRequest, client: str = "") -> Session:
        """open(), making room (swarm.server.fairness) or waiting up to `admission_wait` seconds for capacity that
        other sessions free."""
        deadline = asyncio.get_running_loop().time() + self.limits.admission_wait
        first = request.batch_size * SpanKVCache.reserved_tokens(1, request.max_length)
        source = request.fork[0] if request.fork is not None else None
        while True:
            opened = self._try_open(request, client)
            if not isinstance(opened, str):
                return opened
            if self._free_parked(keep=source) or self._make_room(client, 1, first):
                continue
            if source is not None:  # a fork saves its client a prefill; it has other ways than waiting (take or open)
                raise PeerError(opened, ErrorCode.CAPACITY)
            with self.shares.waiting_for_capacity(client):
                if not await self._budget_freed(deadline):
                    raise PeerError(opened, ErrorCode.CAPACITY)

    def _try_open(self, request: OpenRequest, client: str) -> Session | str:
        """The session, or why it must wait for capacity; raises PeerError for a request refused outright."""
        self._validate_open(request)
        first = request.batch_size * SpanKVCache.reserved_tokens(1, request.max_length)
        slots, tokens = self._holdings()
        for resource, need in ((slots, 1), (tokens, first)):
            refusal = self.shares.refusal(client, need, resource)
            if refusal:
                raise PeerError(refusal, ErrorCode.CAPACITY)
        if not slots.free:
            return f"peer is serving its maximum of {self.limits.max_sessions} sessions"
        handle = next(self._keys)
        key = f"{handle}:{request.session_id}"
        if not self.budget.try_reserve(key, first):
            return f"KV budget exhausted: {first} tokens to start, {self.budget.free} free"
        blocks = slice(request.start - self.span.start, request.end - self.span.start)
        session = Session(key, request.session_id, request.batch_size, request.max_length, blocks,
                          self.span.new_cache(request.max_length), client, push_key=request.push_key, handle=handle)
        self.sessions[key] = self.handles[handle] = session
        self._per_client[_client_blocks(session)] += 1
        logger.debug("opened session %s for %s (blocks %d:%d, up to %d tokens)", key, client, request.start,
                     request.end, request.batch_size * request.max_length)
        return session

    def _validate_open(self, request: OpenRequest) -> None:
        limits, span = self.limits, self.span
        if not 0 < len(request.session_id) <= 128:
            raise bad_request("session_id must be 1..128 characters")
        if not span.start <= request.start < request.end <= span.end:
            raise bad_request(
                f"blocks {request.start}:{request.end} are not within this peer's {span.start}:{span.end}")
        if not 1 <= request.max_length <= limits.max_length:
            raise bad_request(f"max_length must be 1..{limits.max_length}, got {request.max_length}")
        if not 1 <= request.batch_size <= limits.max_batch:
            raise bad_request(f"batch_size must be 1..{limits.max_batch}, got {request.batch_size}")
        if self.draining:
            raise PeerError(self.draining, ErrorCode.MOVED)
        if not self._could_fit(request):
            raise PeerError(f"KV budget exhausted: the session may need {request.batch_size * request.max_length} "
                            f"tokens, this peer's budget is {self.budget.total}", ErrorCode.CAPACITY)

    def _holdings(self) -> tuple[Holdings, Holdings]:
        """Session slots and KV tokens: capacity, free, and what each client holds."""
        slots: collections.Counter[str] = collections.Counter()
        tokens: collections.Counter[str] = collections.Counter()
        for session in self.sessions.values():
            slots[session.client] += 1
            tokens[session.client] += self.budget.reserved.get(session.key, 0)
        return (Holdings("sessions", self.limits.max_sessions, self.limits.max_sessions - len(self.sessions), slots),
                Holdings("KV tokens", self.budget.total, self.budget.free, tokens))

    def parked(self) -> tuple[int, int]:
        """Parked sessions and the KV tokens they hold: capacity a new session gets at once (announced as free)."""
        parked = [s for s in self.sessions.values() if s.parked]
        return len(parked), sum(self.budget.reserved.get(s.key, 0) for s in parked)

    def _free_parked(self, keep: int | None = None) -> bool:
        """Close the parked session (any client's) that stepped least recently, but `keep` (a handle: the source of
        the fork being admitted), to make room; whether one went. A parked session is a cache its client let go
        of (swarm.protocol: park): new sessions and growing ones come before it, and nobody waits for it."""
        parked = [s for s in self.sessions.values() if s.parked and not s.stepping and s.handle != keep]
        if not parked:
            return False
        session = min(parked, key=lambda s: s.last_step)
        logger.debug("freed parked session %s (%d KV tokens) to make room", session.key,
                     self.budget.reserved.get(session.key, 0))
        self._end(session, PeerError("this parked session was freed to make room", ErrorCode.CAPACITY))
        return True

    def _make_room(self, client: str, sessions: int, tokens: int) -> bool:
        """Evict the longest-idle sessions of clients past their share until `client` has `sessions` slots and
        `tokens` KV tokens free, or nobody else is past their share (swarm.server.fairness). Whether any went."""
        evicted = False
        while True:
            slots, kv = self._holdings()
            victim = (self.shares.to_evict(client, sessions, slots) if sessions else None) \
                or (self.shares.to_evict(client, tokens, kv) if tokens else None)
            if victim is None:
                return evicted
            session = min((s for s in self.sessions.values() if s.client == victim), key=lambda s: s.last_step)
            logger.info("handing off session %s of %s (%d KV tokens) to make room for %s", session.key, victim,
                        self.budget.reserved.get(session.key, 0), client)
            self._end(session, PeerError("handed off to make room for other clients: this client held more than "
                                         "its share of this peer", ErrorCode.CAPACITY))
            evicted = True

    def _could_fit(self, request: OpenRequest) -> bool:
        """Whether the session fits the whole budget at its longest (else waiting for other sessions is no use)."""
        return request.batch_size * request.max_length <= self.budget.total

    async def _budget_freed(self, deadline: float) -> bool:
        """Wait until some session closes (True) or the deadline passes (False). Each waiter has its own future,
        resolved by close(), so no wake-up is lost between waiters."""
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        freed = loop.create_future()
        self._freed_waiters.append(freed)
        try:
            async with asyncio.timeout(remaining):
                await freed
            return True
        except TimeoutError:
            return False
        finally:
            if freed in self._freed_waiters:
                self._freed_waiters.remove(freed)

    async def _reserve_growth(self, session: Session, end: int, keep: int | None = None) -> None:
        """Make the session's reservation cover `end` tokens per row (rounded up to the cache's growth chunk): from
        free budget, by making room, or after waiting up to `admission_wait` (swarm.server.fairness)."""
        tokens = session.batch_size * SpanKVCache.reserved_tokens(end, session.max_length)
        deadline = asyncio.get_running_loop().time() + self.limits.admission_wait
        while True:
            self._check_open(session)
            need = tokens - self.budget.reserved.get(session.key, 0)
            if need <= 0:
                return
            refusal = self.shares.refusal(session.client, need, self._holdings()[1])
            if refusal:
                raise PeerError(refusal, ErrorCode.CAPACITY)
            if (self.budget.try_grow(session.key, tokens) or self._free_parked(keep)
                    or self._make_room(session.client, 0, need)):
                continue
            with self.shares.waiting_for_capacity(session.client):
                if not await self._budget_freed(deadline):
                    raise PeerError(f"KV budget exhausted: the session needs {tokens} tokens to grow to {end}, "
                                    f"{self.budget.free} free", ErrorCode.CAPACITY)

    def _check_open(self, session: Session) -> None:
        if session.key not in self.sessions:
            raise session.ended or PeerError("this session was closed", ErrorCode.INTERNAL)

    async def fork(self, session: Session, handle: int, tokens: int, source_id: str) -> None:
        """Start the new `session` with the first `tokens` cached tokens of the session named `handle` whose client
        opened it as `source_id` (swarm.protocol: fork): the same client's, over the same blocks and batch size (a
        handle names a session of this backend only; the id makes a stale handle, reused by another session, fail).
        PeerError (bad_request, capacity) otherwise. Returns once the copy is queued (Scheduler.run_first): it runs
        on the compute thread before a round (usually the next), ahead of any step of either session queued after it,
        so the session's first step can come at once and join that round. The source may be closed meanwhile (its
        client goes on with the fork alone, or the peer evicted it): its cache is kept as it was until the copy has
        read it (nothing steps a closed session). Where the copy cannot be made (the new session closed, the source
        rewound below `tokens` by a step sent before the fork), the session ends (moved: its client replays what it
        forked from the inputs it keeps) before its steps run."""
        source = self.member(handle, session)
        if source is session or source.session_id != source_id or source.batch_size != session.batch_size:
            raise bad_request(f"no session {source_id[:128]!r} of this client with handle {handle} to fork")
        if not 1 <= tokens <= min(source.length, session.max_length):
            raise bad_request(f"cannot fork {tokens} tokens of a session holding {source.length} into one of "
                              f"max_length {session.max_length}")
        await self._reserve_growth(session, tokens, keep=handle)
        self._check_open(session)

        def copy() -> torch.Tensor:
            if session.key not in self.sessions or not session.cache.copy_prefix(source.cache, tokens):
                raise bad_request(f"session {handle} no longer holds {tokens} tokens (or the fork was closed)")
            session.copying = 0  # (only once copied: till failed() ends it, its steps are validated as if copied)
            return torch.empty(0)

        def failed(error: Exception) -> None:
            session.copying = 0
            if session.key in self.sessions:
                self._end(session, PeerError(f"could not start from the session it forked ({error}); replay it",
                                             ErrorCode.MOVED))

        session.copying = tokens
        done = self.scheduler.run_first(copy, session.batch_size * tokens, session.client, (session, source), failed)
        done.add_done_callback(lambda future: future.cancelled() or future.exception())  # (failed() handled it)

    def member(self, handle: object, of: Session) -> Session:
        """The session named `handle` in a group frame that `of`'s stream carried: open, the same client's, over
        the same blocks (bad_request otherwise: a client names only its own sessions)."""
        session = self.handles.get(handle) if isinstance(handle, int) and not isinstance(handle, bool) else None
        if session is None or session.client != of.client or session.blocks != of.blocks:
            raise bad_request(f"no session of this client over these blocks has handle {handle!r}")
        return session

    def close(self, session: Session) -> None:
        if self.sessions.pop(session.key, None) is not None:
            self.handles.pop(session.handle, None)
            owner = _client_blocks(session)
            self._per_client[owner] -= 1
            if self._per_client[owner] <= 0:
                del self._per_client[owner]
            self.budget.release(session.key)
            for waiter in self._freed_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._freed_waiters.clear()
            logger.debug("closed session %s at %d tokens", session.key, session.cache.length)

    def hand_off(self, reason: str, idle_for: float = 0.0) -> int:
        """Close every session (with idle_for: those without a step for that many seconds), marking it moved: its
        next step is refused with MOVED, and its client replays it elsewhere from the inputs it keeps, so nothing
        it computed is lost. Returns how many were handed off."""
        now = time.monotonic()
        sessions = [s for s in self.sessions.values() if now - s.last_step >= idle_for]
        for session in sessions:
            self._end(session, PeerError(reason, ErrorCode.MOVED))
        return len(sessions)

    def _end(self, session: Session, error: PeerError) -> None:
        """Close the session from the peer's side: its handler tells the client `error` (at once if it is waiting
        for the session's next message, else at its next step)."""
        session.ended = error
        self.close(session)
        if session.idle_timer is not None:
            session.idle_timer.reschedule(asyncio.get_running_loop().time())

    @property
    def queued_steps(self) -> int:
        return self.scheduler.queued

    @property
    def decode_forwards(self) -> int:
        return self.scheduler.forwards

    @property
    def decode_rows(self) -> int:
        return self.scheduler.rows

    @property
    def batch_sizes(self) -> list[int]:
        return self.scheduler.batch_sizes

    def validate_step(self, session: Session, hidden: torch.Tensor, position: object) -> None:
        batch, new, hidden_size = hidden.shape
        if batch != session.batch_size:
            raise bad_request(f"batch {batch} differs from the session's batch_size {session.batch_size}")
        if hidden_size != self.span.hidden_size:
            raise bad_request(f"hidden size {hidden_size} differs from the model's {self.span.hidden_size}")
        if new > self.limits.max_chunk_tokens:
            raise bad_request(f"{new} new tokens in one step; send at most {self.limits.max_chunk_tokens}")
        if not isinstance(position, int) or isinstance(position, bool):
            raise bad_request("'position' must be an integer")
        if self.span.encoder and position != 0:
            raise bad_request("an encoder span keeps no cache: send the whole input at position 0")
        if not 0 <= position <= session.length:
            raise bad_request(f"position {position} is outside 0..{session.length} (the tokens cached so far)")
        if position + new > session.max_length:
            raise bad_request(f"position {position} + {new} new tokens exceeds max_length {session.max_length}")
        if not torch.isfinite(hidden).all():
            raise bad_request("hidden states contain NaN or infinity")

    async def step(self, session: Session, hidden: torch.Tensor, position: int,
                   group: tuple[str, int] | None = None) -> torch.Tensor:
        """Run the session's blocks on hidden [B, T, H] at `position`; returns [B, T, H] in the input's dtype.
        `group`: (id, size) of the group of decode steps the client sent this one with (see the module's doc)."""
        self._check_open(session)
        if session.stepping:
            raise bad_request("a step of this session is in flight; send the next one after its answer")
        session.last_step = self.last_step = time.monotonic()
        session.parked = False  # in use again
        self.validate_step(session, hidden, position)
        session.stepping = True
        try:
            if not self.span.encoder:
                await self._reserve_growth(session, position + hidden.shape[1])
            return await self._compute_step(session, hidden, position, self._own_group(session, group))
        except SessionClosed:
            self._check_open(session)
            raise
        finally:
            session.stepping = False

    def _own_group(self, session: Session, group: tuple[str, int] | None) -> tuple[str, int] | None:
        """A group's size counts at most the sessions its client has here over the same blocks: a tag can make
        only its own client's steps wait, and none for members that cannot exist."""
        if group is None:
            return None
        return group[0], min(group[1], self._per_client[_client_blocks(session)])

    async def _compute_step(self, session: Session, hidden: torch.Tensor, position: int,
                            group: tuple[str, int] | None) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        batch, new, _ = hidden.shape
        rounds = batch == 1 and not self.span.encoder and self.limits.max_batch_sessions > 1
        if rounds and new == 1:
            return await self.scheduler.decode(Step(session, hidden, position, loop.create_future(), group))
        chunk = self.limits.prefill_chunk if not self.span.encoder else new
        outputs = []
        for start in range(0, new, chunk):
            part = hidden[:, start : start + chunk]
            if rounds:
                out = await self.scheduler.prefill(Step(session, part, position + start, loop.create_future()))
            else:
                out = await self.scheduler.run(partial(self.compute, session, part, position + start),
                                               part.shape[0] * part.shape[1], session.client, session)
            outputs.append(out)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    async def _run_round(self, steps: list[Step]) -> list[torch.Tensor]:
        return await self.run(self.compute_round, steps)

    def compute_round(self, steps: list[Step]) -> list[torch.Tensor]:
        """On the compute thread: a scheduler's round (steps of one-row sessions over the same blocks) as one forward
        where the family can mix sessions of different lengths in one sequence, else decode rows batched and each
        chunk alone."""
        if len(steps) == 1:
            return [self.compute(steps[0].session, steps[0].hidden, steps[0].position)]
        if all(step.tokens == 1 for step in steps):
            return self.compute_batch([(st.session, st.hidden, st.position) for st in steps])
        if not self.span.mixes:
            decodes = [st for st in steps if st.tokens == 1]
            batched = iter(self.compute_batch([(st.session, st.hidden, st.position) for st in decodes])
                           if decodes else [])
            return [next(batched) if st.tokens == 1 else self.compute(st.session, st.hidden, st.position)
                    for st in steps]
        span = self.span
        hidden = torch.cat([st.hidden[0] for st in steps])[None].to(span.device, span.dtype)
        out = span.forward_mixed(hidden, [Segment(st.session.cache, st.position, st.tokens) for st in steps],
                                 steps[0].session.blocks).to("cpu")
        out = self._count_forward(out, True)
        return [part.to(st.hidden.dtype) for part, st in zip(out.split([st.tokens for st in steps], dim=1), steps,
                                                             strict=True)]

    def compute_batch(self, steps: list[tuple[Session, torch.Tensor, int]], served: bool = True) -> list[torch.Tensor]:
        """On the compute thread: one decode step of each (session, hidden [1, 1, H], position), as one forward.
        `served`: counted as a forward served (a throughput probe is not)."""
        span = self.span
        if len(steps) == 1:
            return [self.compute(*steps[0], served=served)]
        hidden = torch.cat([h for _, h, _ in steps]).to(span.device, span.dtype)
        out = span.forward_batch(hidden, [s.cache for s, _, _ in steps], [p for _, _, p in steps],
                                 steps[0][0].blocks).to("cpu")
        out = self._count_forward(out, served)
        return [out[i : i + 1].to(h.dtype) for i, (_, h, _) in enumerate(steps)]

    def compute(self, session: Session, hidden: torch.Tensor, position: int, served: bool = True) -> torch.Tensor:
        """On the compute thread: the session's blocks on hidden [B, T, H] at `position`."""
        if position > session.cache.length:  # a fork whose copy failed (its session has ended)
            raise session.ended or bad_request(f"position {position} is past the {session.cache.length} cached")
        span = self.span
        out = span(hidden.to(span.device, span.dtype), session.cache, position, session.blocks).to("cpu")
        return self._count_forward(out, served).to(hidden.dtype)

    def _count_forward(self, out: torch.Tensor, served: bool) -> torch.Tensor:
        """Count a forward, and apply the faults a test asked for (a slow peer, a peer gone bad)."""
        self.steps += served
        return self.faults.apply(out, self.steps) if self.faults else out

    def shutdown(self) -> None:
        self.scheduler.close()
        for session in list(self.sessions.values()):
            self.close(session)
        self._executor.shutdown(wait=False, cancel_futures=True)


def _client_blocks(session: Session) -> tuple[str, int, int]:
    """Whose sessions over which blocks (a slice is not hashable before Python 3.12)."""
    return session.client, session.blocks.start, session.blocks.stop
