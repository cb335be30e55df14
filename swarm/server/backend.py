"""The peer's compute: sessions over its span, each with its own KV cache, validated and run off the event loop.

All torch work happens on one dedicated thread, so the asyncio loop that serves the network never blocks and steps
of different sessions never run concurrently on the same weights.

Continuous batching: a decode step (one new token of a one-row session) does not run alone. It joins a queue; a
batcher task takes every queued decode step (up to `max_batch_sessions`) and runs them as one batched forward
(BlockSpan.forward_batch), so the weights are read once per round instead of once per session. How long it waits
for more before starting (at most `batch_wait`):
- a step may say which group of steps it was sent with (`group`: an id and the group's size; our client sends the
  decode steps of its sessions in such groups, see swarm.client.decoding): the batcher waits until every member of
  each group it holds has arrived, and not for anyone else. A client pipelines its sessions through a chain this way
  (one group computes here while another computes on the next peer), which waiting for every decoding session would
  undo by merging the groups;
- a step without a group waits for every session that decodes without groups now (it sent a step in the last
  second): their steps arrive spread out, and a batch started on the first arrivals would split them into several
  smaller forwards for good.
The batcher sleeps on an event between arrivals (no polling). A multi-token step (a prefill) runs in chunks of
`prefill_chunk` tokens, each its own job on the compute thread, so decode batches run between the chunks of a long
prompt instead of waiting for all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from swarm.model.span import BlockSpan, SpanKVCache
from swarm.protocol import BATCH_PROBE, ErrorCode, OpenRequest, PeerError
from swarm.server.memory import KVBudget

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one client may ask of this peer."""

    max_sessions: int = 64
    max_length: int = 8192
    max_batch: int = 8
    max_chunk_tokens: int = 2048  # new tokens in one step; a longer prefill is sent in several steps
    max_batch_sessions: int = 32  # decode steps of different sessions run together
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
    opened_at: float = field(default_factory=time.monotonic)
    last_step: float = field(default_factory=time.monotonic)  # when its last step arrived
    moved: str | None = None  # why the peer handed this session off (it left these blocks), once it has
    idle_timer: asyncio.Timeout | None = None  # while the handler waits for the session's next message


@dataclass
class _Step:
    """A decode step waiting for the batcher."""

    session: Session
    hidden: torch.Tensor
    position: int
    future: asyncio.Future
    group: tuple[str, int] | None  # (id, size) of the group of steps the client sent it with


def bad_request(message: str) -> PeerError:
    return PeerError(message, ErrorCode.BAD_REQUEST)


class SpanBackend:
    def __init__(self, span: BlockSpan, limits: Limits, budget: KVBudget, fault_nan_after: int = 0,
                 fault_step_delay: float = 0.0):
        self.span = span
        self.fault_nan_after = fault_nan_after  # tests of client-side answer checks: a peer gone bad
        self.fault_step_delay = fault_step_delay  # tests of routing: a peer made slow (every forward sleeps this)
        self.draining: str | None = None  # why new sessions are refused (the peer is leaving this span)
        self.steps = 0
        self.limits = limits
        self.budget = budget
        self.sessions: dict[str, Session] = {}
        self._keys = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="span-compute")
        self._pending: list[_Step] = []
        self._wake: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self.decode_forwards = self.decode_rows = 0  # batcher rounds' forwards and the session steps they carried
        self._decoding: dict[str, float] = {}  # session key → when it last sent a decode step without a group
        # group id → [its steps arrived so far, its size]: a group larger than max_batch_sessions runs as several
        # forwards, and its later members must not wait for those already computed
        self._arrived: dict[str, list[int]] = {}
        self._logged = (0.0, 0, 0)  # (when, decode_forwards, decode_rows) at the last batching log line
        self.batch_sizes: list[int] = []  # every batched decode's size (recent ones), for tests and stats
        self._freed_waiters: list[asyncio.Future] = []  # sessions waiting for KV budget; resolved on every close

    def open(self, request: OpenRequest) -> Session:
        """Validate an open request and reserve its KV; raises PeerError with a message for the client."""
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
        if len(self.sessions) >= limits.max_sessions:
            raise PeerError(f"peer is serving its maximum of {limits.max_sessions} sessions", ErrorCode.CAPACITY)
        key = f"{next(self._keys)}:{request.session_id}"
        most = request.batch_size * request.max_length
        if not self._could_fit(request):
            raise PeerError(f"KV budget exhausted: the session may need {most} tokens, this peer's budget is "
                            f"{self.budget.total}", ErrorCode.CAPACITY)
        first = request.batch_size * min(request.max_length, SpanKVCache.GROW)
        if not self.budget.try_reserve(key, first):
            raise PeerError(f"KV budget exhausted: {first} tokens to start, {self.budget.free} free",
                            ErrorCode.CAPACITY)
        blocks = slice(request.start - span.start, request.end - span.start)
        session = Session(key, request.session_id, request.batch_size, request.max_length, blocks,
                          span.new_cache(request.max_length))
        self.sessions[key] = session
        logger.debug("opened session %s (blocks %d:%d, up to %d tokens)", key, request.start, request.end, most)
        return session

    async def admit(self, request: OpenRequest) -> Session:
        """open(), waiting up to `admission_wait` seconds for KV budget that other sessions free."""
        deadline = asyncio.get_running_loop().time() + self.limits.admission_wait
        while True:
            try:
                return self.open(request)
            except PeerError as e:
                if e.code != ErrorCode.CAPACITY or not self._could_fit(request) or not await self._budget_freed(
                        deadline):
                    raise

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

    async def _reserve_growth(self, session: Session, end: int) -> None:
        """Make the session's reservation cover `end` tokens per row (rounded up to the cache's growth chunk)."""
        chunks = -(-end // SpanKVCache.GROW) * SpanKVCache.GROW
        tokens = session.batch_size * min(session.max_length, chunks)
        deadline = asyncio.get_running_loop().time() + self.limits.admission_wait
        while not self.budget.try_grow(session.key, tokens):
            if not await self._budget_freed(deadline):
                raise PeerError(f"KV budget exhausted: the session needs {tokens} tokens to grow to {end}, "
                                f"{self.budget.free} free", ErrorCode.CAPACITY)

    def close(self, session: Session) -> None:
        if self.sessions.pop(session.key, None) is not None:
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
            session.moved = reason
            self.close(session)
            if session.idle_timer is not None:  # wake a handler waiting for this session's next message
                session.idle_timer.reschedule(asyncio.get_running_loop().time())
        return len(sessions)

    @property
    def queued_steps(self) -> int:
        return len(self._pending)

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
        if not 0 <= position <= session.cache.length:
            raise bad_request(f"position {position} is outside 0..{session.cache.length} (the tokens cached so far)")
        if position + new > session.max_length:
            raise bad_request(f"position {position} + {new} new tokens exceeds max_length {session.max_length}")
        if not torch.isfinite(hidden).all():
            raise bad_request("hidden states contain NaN or infinity")

    async def step(self, session: Session, hidden: torch.Tensor, position: int,
                   group: tuple[str, int] | None = None) -> torch.Tensor:
        """Run the session's blocks on hidden [B, T, H] at `position`; returns [B, T, H] in the input's dtype.
        `group`: (id, size) of the group of decode steps the client sent this one with (see the module's doc)."""
        if session.moved:
            raise PeerError(session.moved, ErrorCode.MOVED)
        session.last_step = time.monotonic()
        self.validate_step(session, hidden, position)
        loop = asyncio.get_running_loop()
        batch, new, _ = hidden.shape
        if not self.span.encoder:
            await self._reserve_growth(session, position + new)
        if new == 1 and batch == 1 and not self.span.encoder and self.limits.max_batch_sessions > 1:
            future = loop.create_future()
            if group is None:
                self._decoding[session.key] = loop.time()
            else:
                self._arrived.setdefault(group[0], [0, group[1]])[0] += 1
            self._pending.append(_Step(session, hidden, position, future, group))
            self._ensure_batcher().set()
            return await future
        chunk = self.limits.prefill_chunk if not self.span.encoder else new
        outputs = []
        for start in range(0, new, chunk):
            outputs.append(await loop.run_in_executor(self._executor, self._compute, session,
                                                      hidden[:, start : start + chunk], position + start))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _ensure_batcher(self) -> asyncio.Event:
        if (self._wake is None or self._batcher is None or self._batcher.done()
                or self._batcher.get_loop() is not asyncio.get_running_loop()):
            self._wake = asyncio.Event()
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop(), name="span-batcher")
        return self._wake

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        idle = True  # steps without a group wait for their peers only when the batcher was idle: arrivals during
        # a forward run right after it, as an uneven second batch that pipelines a little with the next peer
        while True:
            while not self._pending:
                idle = True
                await self._wake.wait()
                self._wake.clear()
            now = loop.time()
            self._decoding = {k: t for k, t in self._decoding.items() if now - t < 1.0 and k in self.sessions}
            deadline = now + self.limits.batch_wait
            while self._expecting_more(ungrouped=idle) and loop.time() < deadline:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._wake.wait()
                self._wake.clear()
            idle = False
            if self._pending:
                taken = self._pending[: self.limits.max_batch_sessions]
                del self._pending[: len(taken)]
                self._forget_groups()
                live = [step for step in taken if not step.future.done() and step.session.key in self.sessions]
                by_blocks: dict[tuple[int, int], list[_Step]] = {}
                for step in live:  # sessions over different parts of the span run as different batches
                    by_blocks.setdefault((step.session.blocks.start, step.session.blocks.stop), []).append(step)
                for steps in by_blocks.values():
                    try:
                        outputs = await loop.run_in_executor(self._executor, self._compute_batch,
                                                             [(st.session, st.hidden, st.position) for st in steps])
                    except Exception as e:
                        for step in steps:
                            if not step.future.done():
                                step.future.set_exception(e)
                        continue
                    for step, out in zip(steps, outputs, strict=True):
                        if not step.future.done():
                            step.future.set_result(out)
                self.decode_forwards += len(by_blocks)
                self.decode_rows += len(live)
                when, forwards, rows = self._logged
                if loop.time() - when > 10 and self.decode_forwards > forwards:
                    logger.info("decode batching: %.1f sessions per forward on average over %d forwards",
                                (self.decode_rows - rows) / (self.decode_forwards - forwards),
                                self.decode_forwards - forwards)
                    self._logged = (loop.time(), self.decode_forwards, self.decode_rows)

    def _expecting_more(self, ungrouped: bool) -> bool:
        """Whether queued steps announce more that should join their forward: members of a queued step's group not
        here yet, or (`ungrouped`: for steps without a group) sessions decoding without groups that have not sent
        theirs."""
        pending = self._pending
        if len(pending) >= self.limits.max_batch_sessions:
            return False
        sizes = {step.group[0]: step.group[1] for step in pending if step.group is not None}
        if any(self._arrived.get(key, [0])[0] < size for key, size in sizes.items()):
            return True
        alone = sum(step.group is None for step in pending)
        return ungrouped and 0 < alone < len(self._decoding)

    def _forget_groups(self) -> None:
        """Forget the counts of groups no longer queued that are complete; of the incomplete ones (a member may
        still come), keep the most recent 4 x max_sessions."""
        queued = {step.group[0] for step in self._pending if step.group is not None}
        kept = {key: c for key, c in self._arrived.items() if key in queued or c[0] < c[1]}
        waiting = [key for key in kept if key not in queued]  # oldest first
        for key in waiting[: max(0, len(waiting) - 4 * self.limits.max_sessions)]:
            del kept[key]
        self._arrived = kept

    def _compute_batch(self, steps: list[tuple[Session, torch.Tensor, int]]) -> list[torch.Tensor]:
        """One decode step of each (session, hidden [1, 1, H], position), as one forward."""
        span = self.span
        if len(steps) == 1:
            return [self._compute(*steps[0])]
        hidden = torch.cat([h for _, h, _ in steps]).to(span.device, span.dtype)
        out = span.forward_batch(hidden, [s.cache for s, _, _ in steps], [p for _, _, p in steps],
                                 steps[0][0].blocks).to("cpu")
        self.batch_sizes = [*self.batch_sizes[-999:], len(steps)]
        out = self._count_forward(out)
        return [out[i : i + 1].to(h.dtype) for i, (_, h, _) in enumerate(steps)]

    def _compute(self, session: Session, hidden: torch.Tensor, position: int) -> torch.Tensor:
        span = self.span
        out = span(hidden.to(span.device, span.dtype), session.cache, position, session.blocks).to("cpu")
        return self._count_forward(out).to(hidden.dtype)

    def _count_forward(self, out: torch.Tensor) -> torch.Tensor:
        """Count a forward, and apply the faults a test asked for (a slow peer, a peer gone bad)."""
        self.steps += 1
        if self.fault_step_delay:
            time.sleep(self.fault_step_delay)
        if self.fault_nan_after and self.steps > self.fault_nan_after:
            out = torch.full_like(out, float("nan"))
        return out

    def probe(self, prefix: int = 128) -> Callable[[int], None]:
        """For throughput measurement, before serving: a function running one decode step of `batch` sessions
        (at most BATCH_PROBE) over the whole span after `prefix` cached tokens, through the real compute path."""
        span = self.span
        generator = torch.Generator().manual_seed(0)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(span.device, span.dtype)

        sessions = [Session(f"probe:{i}", "probe", 1, prefix + 1, slice(0, len(span.blocks)),
                            span.new_cache(prefix + 1)) for i in range(BATCH_PROBE)]
        if not span.encoder:
            for session in sessions:
                span(randn(1, prefix, span.hidden_size), session.cache, 0)

        def step(batch: int) -> None:
            steps, sizes = self.steps, self.batch_sizes  # a probe is not a step served
            position = 0 if span.encoder else prefix
            items = [(s, randn(1, 1, span.hidden_size), position) for s in sessions[:batch]]
            if span.encoder:
                self._compute(sessions[0], randn(batch, 1, span.hidden_size), 0)
            else:
                self._compute_batch(items)
            if span.device.type == "cuda":
                torch.cuda.synchronize()
            self.steps, self.batch_sizes = steps, sizes

        return step

    def shutdown(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        for step in self._pending:
            if not step.future.done():
                step.future.cancel()
        self._pending.clear()
        for session in list(self.sessions.values()):
            self.close(session)
        self._executor.shutdown(wait=False, cancel_futures=True)
