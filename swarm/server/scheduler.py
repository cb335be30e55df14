"""What a peer's compute thread runs next: rounds of decode steps and prefill chunks, and everything else between.

A round is one forward: every ready decode step (one new token of a one-row session, up to `max_batch_sessions`)
together with queued prefill chunks (of one-row sessions) up to `round_tokens` tokens. The weights are read once for
all of them, a burst of prompts is computed a few at a time while the decoding sessions go on (each round carries
them), and nobody waits behind more than one round. How the backend computes a round (one sequence of every step,
or a decode batch and the chunks apart, for families that cannot mix) is its choice.

Clients (the remote peer ids of the sessions' streams) take turns: when a round cannot carry everything queued, the
client served longest ago goes first, one item at a time per client, so one client's burst of prompts or sessions
delays another's by a round at most, not by its whole queue. A client has at most one step queued per session (its
stream sends the next step after the last answer), so what it can queue is bounded by its share of the sessions.

When decode steps are ready (how long they may wait for more, at most `batch_wait` from a client's first queued one):
- a step may say which group of steps it was sent with (`group`: an id and the group's size; our client sends the
  decode steps of its sessions in such groups, see swarm.client.decoding): it waits until every member of its
  client's groups queued has arrived, and not for anyone else. A client pipelines its sessions through a chain this
  way (one group computes here while another computes on the next peer), which waiting for every decoding session
  would undo by merging the groups. Group ids are the client's own (another client naming one is another group),
  and the backend caps a group's size at the sessions its client holds here: a tag can hold back only its own
  client's steps, and those at most `batch_wait`;
- a step without a group waits for its client's other sessions that decode without groups now (they sent a step in
  the last second), when the scheduler was idle: their steps arrive spread out, and a batch started on the first
  arrivals would split them into several smaller forwards for good. Steps arriving during a round run right after it.
A round carries the ready clients' steps; a client still waiting for its members joins a later one. Queued prefill
chunks never wait for a decode batch's late members: a round without the decode steps runs them.

A prompt longer than a chunk is several chunks, submitted one after the other (each after the previous one's result),
so other prompts' chunks run between its chunks. Jobs (steps of sessions of several rows, encoder inputs: whatever
cannot join a round) run after the round, in the same budget. Jobs that sessions' steps must follow (forks'
copies: run_first) run before a round, in a budget of their own; those sessions' steps queued after them wait until
they are taken. The scheduler sleeps on an event between arrivals. A step whose session was closed while it waited
(handed off, evicted) fails with SessionClosed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

UNGROUPED_MEMORY = 1.0  # seconds a session that sent an ungrouped decode step counts as decoding
FIRST_ROUNDS = 16  # first jobs (forks' copies) taken per round: up to this many rounds' tokens (at least one job)
LOG_PERIOD = 10.0  # seconds between batching log lines


class SessionClosed(Exception):
    """The step's session was closed while the step waited for a round (the backend knows why)."""


@dataclass(eq=False)
class Step:
    """A step of a one-row session waiting for a round: a decode step (one token) or a prefill chunk."""

    session: Any  # swarm.server.backend.Session
    hidden: torch.Tensor  # [1, T, H]
    position: int
    future: asyncio.Future
    group: tuple[str, int] | None = None  # decode steps: (id, size) of the group the client sent it with

    @property
    def tokens(self) -> int:
        return self.hidden.shape[1]

    @property
    def client(self) -> str:
        return self.session.client


@dataclass(eq=False)
class Job:
    """Compute that cannot join a round: fn() runs on the compute thread; its result or exception goes to `future`."""

    fn: Callable[[], torch.Tensor]
    tokens: int  # rows x new tokens, for the round's budget
    future: asyncio.Future
    client: str = ""
    # a job that steps of the sessions it `holds` must follow (a fork's copy: Scheduler.run_first): run before the
    # round it is taken with, those sessions' steps taken no sooner, `failed` called with its exception before the
    # round's steps run
    first: bool = False
    failed: Callable[[Exception], None] | None = None
    holds: tuple[Any, ...] = ()
    session: Any = None  # (a job of one session's step: held back while a first job holds that session)


# run_round(steps) → each step's output [1, T, H], in order (all steps over the same blocks of the span)
RunRound = Callable[[list[Step]], Awaitable[list[torch.Tensor]]]
RunJob = Callable[[Callable[[], torch.Tensor]], Awaitable[torch.Tensor]]


class Scheduler:
    def __init__(self, run_round: RunRound, run_job: RunJob, max_batch_sessions: int, batch_wait: float,
                 round_tokens: int, max_groups_kept: int, is_open: Callable[[Any], bool]):
        self._run_round, self._run_job, self._is_open = run_round, run_job, is_open
        self.max_batch_sessions, self.batch_wait, self.round_tokens = max_batch_sessions, batch_wait, round_tokens
        self.max_groups_kept = max_groups_kept  # incomplete groups remembered (a member may still come)
        self._decodes: list[Step] = []
        self._work: collections.deque[Step | Job] = collections.deque()  # prefill chunks and jobs, in arrival order
        self._since: dict[str, float] = {}  # client → when its queued decode steps started waiting
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # session key → (its client, when it last sent a decode step without a group)
        self._decoding: dict[str, tuple[str, float]] = {}
        # (client, group id) → [its steps arrived so far, its size]: a group larger than max_batch_sessions runs as
        # several rounds, and its later members must not wait for those already computed
        self._arrived: dict[tuple[str, str], list[int]] = {}
        self._served: dict[str, int] = {}  # client with work queued → the round it was last served in
        self._held: dict[int, int] = {}  # id(session) → first jobs holding it, not run yet
        self._rounds = 0
        self.forwards = self.rows = 0  # rounds with decode steps, and the decode steps they carried
        self.batch_sizes: list[int] = []  # decode steps of every round with several (recent ones), for stats
        self._logged = (0.0, 0, 0)  # (when, forwards, rows) at the last batching log line

    @property
    def queued(self) -> int:
        return len(self._decodes) + len(self._work)

    async def decode(self, step: Step) -> torch.Tensor:
        now = asyncio.get_running_loop().time()
        if step.group is None:
            self._decoding[step.session.key] = (step.client, now)
        else:
            self._arrived.setdefault((step.client, step.group[0]), [0, step.group[1]])[0] += 1
        self._since.setdefault(step.client, now)
        self._decodes.append(step)
        self._ensure_running().set()
        return await step.future

    async def prefill(self, step: Step) -> torch.Tensor:
        """A chunk of a one-row session's prompt, in a round after the chunks and jobs queued before it."""
        return await self._queue(step)

    async def run(self, fn: Callable[[], torch.Tensor], tokens: int, client: str = "",
                  session: Any = None) -> torch.Tensor:
        """fn() on the compute thread, after the chunks and jobs queued before it (`session`: the session whose step
        it is, if any)."""
        return await self._queue(Job(fn, tokens, asyncio.get_running_loop().create_future(), client, session=session))

    def run_first(self, fn: Callable[[], torch.Tensor], tokens: int, client: str, holds: tuple[Any, ...],
                  failed: Callable[[Exception], None]) -> asyncio.Future:
        """Queue a job (a fork's copy: `tokens` copied) that runs on the compute thread before a round, ahead of
        every step and job of the sessions it `holds` queued after it: those wait until it is taken, and run in the
        round after it. First jobs are taken before the rest of the work, clients in turns, up to FIRST_ROUNDS
        rounds' tokens a round (at least one), so the first step of a forked session usually joins the next round.
        `failed(exception)` is called on the event loop before that round's steps run. Returns its future (queued
        now: callers need not await it)."""
        job = Job(fn, tokens, asyncio.get_running_loop().create_future(), client, True, failed, holds)
        for session in holds:
            self._held[id(session)] = self._held.get(id(session), 0) + 1
        self._work.append(job)
        self._ensure_running().set()
        return job.future

    async def _queue(self, item: Step | Job) -> torch.Tensor:
        self._work.append(item)
        self._ensure_running().set()
        return await item.future

    def _ensure_running(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="span-scheduler")
        return self._wake

    async def _loop(self) -> None:
        idle = True  # steps without a group wait for their peers only when the scheduler was idle
        while True:
            idle = await self._wait(idle)
            firsts, held = self._take_first()
            decodes = self._take_decodes(idle, held)
            chunks, jobs = self._take_work(held)
            if decodes:
                idle = False
            self._count_turns([*firsts, *decodes, *chunks, *jobs])
            if firsts:
                for job in firsts:
                    await self._run_alone(job)
                decodes = [step for step in decodes if self._live(step)]  # (a failed copy closes its session)
                chunks = [step for step in chunks if self._live(step)]
            await self._run(decodes, chunks)
            for job in jobs:
                await self._run_alone(job)

    async def _wait(self, idle: bool) -> bool:
        """Until chunks or jobs are queued, or some client's decode steps are ready (see _ready). Returns whether the
        scheduler was idle before this work came."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not self._decodes and not self._work:
            idle = True
            await self._wake.wait()
            self._wake.clear()
        now = loop.time()
        self._decoding = {k: v for k, v in self._decoding.items() if now - v[1] < UNGROUPED_MEMORY}
        while not self._work and not self._ready(idle):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(min(self._since.values()) + self.batch_wait):
                    await self._wake.wait()
            self._wake.clear()
        return idle

    def _ready(self, ungrouped: bool) -> set[str]:
        """The clients whose queued decode steps go in the next round: all of them when a round's worth is queued;
        else those not expecting more of their own steps, or that waited batch_wait for them."""
        steps: dict[str, list[Step]] = {}
        for step in self._decodes:  # (steps held behind a fork's copy wait for it, not for a round's worth)
            if id(step.session) not in self._held:
                steps.setdefault(step.client, []).append(step)
        if sum(len(queued) for queued in steps.values()) >= self.max_batch_sessions:
            return set(steps)
        now = asyncio.get_running_loop().time()
        return {client for client, queued in steps.items()
                if now >= self._since[client] + self.batch_wait or not self._expecting_more(client, queued, ungrouped)}

    def _expecting_more(self, client: str, queued: list[Step], ungrouped: bool) -> bool:
        """Whether the client's queued steps announce more of its steps that should join their round: members of a
        queued step's group not here yet, or (`ungrouped`: for steps without a group) its sessions decoding without
        groups that have not sent theirs."""
        sizes = {step.group[0]: step.group[1] for step in queued if step.group is not None}
        if any(self._arrived.get((client, key), [0])[0] < size for key, size in sizes.items()):
            return True
        alone = sum(step.group is None for step in queued)
        decoding = sum(1 for key, (owner, _) in self._decoding.items() if owner == client and self._is_open(key))
        return ungrouped and 0 < alone < decoding

    def _take_first(self) -> tuple[list[Job], set[int]]:
        """The first jobs of this round (see run_first), and the sessions still held by first jobs not taken."""
        firsts = [item for item in self._work if isinstance(item, Job) and item.first]
        if not firsts:
            return [], set()
        taken = self._take_within(firsts, FIRST_ROUNDS * self.round_tokens)
        held = {key for key, n in self._held.items() if n > sum(id(s) == key for job in taken for s in job.holds)}
        return taken, held

    def _take_decodes(self, idle: bool, held: set[int]) -> list[Step]:
        """The decode steps of this round: the ready clients' (up to max_batch_sessions, clients in turns), but not
        those of sessions `held` by first jobs not taken yet."""
        ready = self._ready(idle) if self._decodes else set()
        if not ready:
            return []
        free = [step for step in self._decodes if step.client in ready and id(step.session) not in held]
        taken = self._in_turns(free)[: self.max_batch_sessions]
        chosen = {id(step) for step in taken}
        self._decodes = [step for step in self._decodes if id(step) not in chosen]
        left = {step.client for step in self._decodes}
        now = asyncio.get_running_loop().time()
        for client in ready:  # a ready client's steps left over (a group larger than a round) start a new wait
            if client in left:
                self._since[client] = now
            else:
                self._since.pop(client, None)
        self._forget_groups()
        return [step for step in taken if self._live(step)]

    def _take_work(self, held: set[int]) -> tuple[list[Step], list[Job]]:
        """Chunks and jobs up to the round's token budget, clients in turns, at least one (if any may go: not
        first jobs, nor the work of sessions `held`)."""
        free = [item for item in self._work if not (isinstance(item, Job) and item.first)
                and id(item.session) not in held]
        taken = self._take_within(free, self.round_tokens)
        chunks = [item for item in taken if isinstance(item, Step) and self._live(item)]
        jobs = [item for item in taken if isinstance(item, Job) and not item.future.done()]
        return chunks, jobs

    def _take_within(self, items: list[Any], budget: int) -> list[Any]:
        """Of `items` (queued work), those taken off the queue for this round: clients in turns, up to `budget`
        tokens (at least one)."""
        taken = []
        for item in self._in_turns(items):
            if budget <= 0:
                break
            taken.append(item)
            budget -= item.tokens
        chosen = {id(item) for item in taken}
        self._work = collections.deque(item for item in self._work if id(item) not in chosen)
        return taken

    def _in_turns(self, items: list[Any]) -> list[Any]:
        """`items` (steps or jobs) in turns across their clients, each client's in arrival order, the client served
        longest ago (or never) first."""
        queues: dict[str, collections.deque] = {}
        for item in items:
            queues.setdefault(item.client, collections.deque()).append(item)
        order = sorted(queues, key=lambda client: self._served.get(client, -1))
        ordered: list[Any] = []
        while len(ordered) < len(items):
            ordered.extend(queues[client].popleft() for client in order if queues[client])
        return ordered

    def _count_turns(self, served: list[Any]) -> None:
        """Note the clients this round serves; forget those with nothing queued (they go first when they return)."""
        self._rounds += 1
        for item in served:
            self._served[item.client] = self._rounds
        queued = {item.client for item in [*self._decodes, *self._work]}
        self._served = {client: r for client, r in self._served.items() if client in queued}

    def _live(self, step: Step) -> bool:
        """Whether the step is still wanted; a step of a closed session fails with SessionClosed."""
        if step.future.done():
            return False
        if not self._is_open(step.session.key):
            step.future.set_exception(SessionClosed())
            return False
        return True

    def _forget_groups(self) -> None:
        """Forget the counts of groups no longer queued that are complete; of the incomplete ones (a member may
        still come), keep the most recent `max_groups_kept`."""
        queued = {(step.client, step.group[0]) for step in self._decodes if step.group is not None}
        kept = {key: c for key, c in self._arrived.items() if key in queued or c[0] < c[1]}
        waiting = [key for key in kept if key not in queued]  # oldest first
        for key in waiting[: max(0, len(waiting) - self.max_groups_kept)]:
            del kept[key]
        self._arrived = kept

    async def _run(self, decodes: list[Step], chunks: list[Step]) -> None:
        """The round: one forward per part of the span its sessions cover; each step gets its output or the error."""
        by_blocks: dict[tuple[int, int], list[Step]] = {}
        for step in decodes + chunks:
            blocks = step.session.blocks
            by_blocks.setdefault((blocks.start, blocks.stop), []).append(step)
        for steps in by_blocks.values():
            outputs: list[torch.Tensor | Exception]
            try:
                outputs = list(await self._run_round(steps))
            except Exception as e:
                outputs = [e] * len(steps)
            for step, out in zip(steps, outputs, strict=True):
                if step.future.done():
                    continue
                if isinstance(out, Exception):
                    step.future.set_exception(out)
                else:
                    step.future.set_result(out)
            self._count(sum(1 for step in steps if any(step is d for d in decodes)))

    async def _run_alone(self, job: Job) -> None:
        try:
            if job.future.done():  # (cancelled)
                return
            try:
                result = await self._run_job(job.fn)
            except Exception as e:
                if job.failed is not None:
                    try:
                        job.failed(e)
                    except Exception:  # (the scheduler goes on whatever a callback does)
                        logger.exception("a first job's failure callback failed")
                if not job.future.done():
                    job.future.set_exception(e)
                return
            if not job.future.done():
                job.future.set_result(result)
        finally:
            for session in job.holds:
                left = self._held.get(id(session), 0) - 1
                if left > 0:
                    self._held[id(session)] = left
                else:
                    self._held.pop(id(session), None)

    def _count(self, decode_rows: int) -> None:
        if not decode_rows:
            return
        self.forwards += 1
        self.rows += decode_rows
        if decode_rows > 1:
            self.batch_sizes = [*self.batch_sizes[-999:], decode_rows]
        now = asyncio.get_running_loop().time()
        when, forwards, rows = self._logged
        if now - when > LOG_PERIOD and self.forwards > forwards:
            logger.info("decode batching: %.1f sessions per forward on average over %d forwards",
                        (self.rows - rows) / (self.forwards - forwards), self.forwards - forwards)
            self._logged = (now, self.forwards, self.rows)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for item in [*self._decodes, *self._work]:
            if not item.future.done():
                item.future.cancel()
        self._decodes.clear()
        self._work.clear()
        self._since.clear()
        self._held.clear()
