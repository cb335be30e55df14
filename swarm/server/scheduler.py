"""What a peer's compute thread runs next: rounds of decode steps and prefill chunks, and everything else between.

A round is one forward: every ready decode step (one new token of a one-row session, up to `max_batch_sessions`)
together with queued prefill chunks (of one-row sessions) up to `round_tokens` tokens, first come first served. The
weights are read once for all of them, a burst of prompts is computed a few at a time while the decoding sessions
go on (each round carries them), and nobody waits behind more than one round. How the backend computes a round
(one sequence of every step, or a decode batch and the chunks apart, for families that cannot mix) is its choice.

When decode steps are ready (how long they may wait for more, at most `batch_wait`):
- a step may say which group of steps it was sent with (`group`: an id and the group's size; our client sends the
  decode steps of its sessions in such groups, see swarm.client.decoding): it waits until every member of each
  group queued has arrived, and not for anyone else. A client pipelines its sessions through a chain this way (one
  group computes here while another computes on the next peer), which waiting for every decoding session would undo
  by merging the groups;
- a step without a group waits for every session that decodes without groups now (it sent a step in the last
  second), when the scheduler was idle: their steps arrive spread out, and a batch started on the first arrivals
  would split them into several smaller forwards for good. Steps arriving during a round run right after it.
Queued prefill chunks never wait for a decode batch's late members: a round without the decode steps runs them.

A prompt longer than a chunk is several chunks, submitted one after the other (each after the previous one's result),
so other prompts' chunks run between its chunks. Jobs (steps of sessions of several rows, encoder inputs: whatever
cannot join a round) run after the round, in the same budget. The scheduler sleeps on an event between arrivals.
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
LOG_PERIOD = 10.0  # seconds between batching log lines


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


@dataclass(eq=False)
class Job:
    """Compute that cannot join a round: fn() runs on the compute thread; its result or exception goes to `future`."""

    fn: Callable[[], torch.Tensor]
    tokens: int  # rows x new tokens, for the round's budget
    future: asyncio.Future


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
        self._deadline: float | None = None  # when the queued decode steps stop waiting for more
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._decoding: dict[str, float] = {}  # session key → when it last sent a decode step without a group
        # group id → [its steps arrived so far, its size]: a group larger than max_batch_sessions runs as several
        # rounds, and its later members must not wait for those already computed
        self._arrived: dict[str, list[int]] = {}
        self.forwards = self.rows = 0  # rounds with decode steps, and the decode steps they carried
        self.batch_sizes: list[int] = []  # decode steps of every round with several (recent ones), for stats
        self._logged = (0.0, 0, 0)  # (when, forwards, rows) at the last batching log line

    @property
    def queued(self) -> int:
        return len(self._decodes) + len(self._work)

    async def decode(self, step: Step) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if step.group is None:
            self._decoding[step.session.key] = loop.time()
        else:
            self._arrived.setdefault(step.group[0], [0, step.group[1]])[0] += 1
        self._decodes.append(step)
        self._ensure_running().set()
        return await step.future

    async def prefill(self, step: Step) -> torch.Tensor:
        """A chunk of a one-row session's prompt, in a round after the chunks and jobs queued before it."""
        return await self._queue(step)

    async def run(self, fn: Callable[[], torch.Tensor], tokens: int) -> torch.Tensor:
        """fn() on the compute thread, after the chunks and jobs queued before it."""
        return await self._queue(Job(fn, tokens, asyncio.get_running_loop().create_future()))

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
            decodes = self._take_decodes(idle)
            chunks, jobs = self._take_work()
            if decodes:
                idle = False
            await self._run(decodes, chunks)
            for job in jobs:
                await self._run_alone(job)

    async def _wait(self, idle: bool) -> bool:
        """Until chunks or jobs are queued, or decode steps are queued and the ones they announce have come (at most
        batch_wait). Returns whether the scheduler was idle before this work came."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not self._decodes and not self._work:
            idle = True
            await self._wake.wait()
            self._wake.clear()
        if self._decodes and self._deadline is None:
            now = loop.time()
            self._decoding = {k: t for k, t in self._decoding.items() if now - t < UNGROUPED_MEMORY}
            self._deadline = now + self.batch_wait
        while not self._work and self._expecting_more(idle) and not self._waited_enough():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._deadline or loop.time()):
                    await self._wake.wait()
            self._wake.clear()
        return idle

    def _waited_enough(self) -> bool:
        return self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline

    def _expecting_more(self, ungrouped: bool) -> bool:
        """Whether queued steps announce more that should join their round: members of a queued step's group not
        here yet, or (`ungrouped`: for steps without a group) sessions decoding without groups that have not sent
        theirs."""
        pending = self._decodes
        if len(pending) >= self.max_batch_sessions:
            return False
        sizes = {step.group[0]: step.group[1] for step in pending if step.group is not None}
        if any(self._arrived.get(key, [0])[0] < size for key, size in sizes.items()):
            return True
        alone = sum(step.group is None for step in pending)
        decoding = sum(1 for key in self._decoding if self._is_open(key))
        return ungrouped and 0 < alone < decoding

    def _take_decodes(self, idle: bool) -> list[Step]:
        """The decode steps of this round: all queued (up to max_batch_sessions), once ready; [] before."""
        if not self._decodes or (self._expecting_more(idle) and not self._waited_enough()):
            return []
        taken = self._decodes[: self.max_batch_sessions]
        del self._decodes[: len(taken)]
        self._deadline = None  # the steps left (a group larger than a round) start a new wait
        self._forget_groups()
        return [step for step in taken if self._live(step)]

    def _take_work(self) -> tuple[list[Step], list[Job]]:
        """Chunks and jobs up to the round's token budget, first come first served, at least one."""
        chunks: list[Step] = []
        jobs: list[Job] = []
        budget = self.round_tokens
        while self._work and budget > 0:
            item = self._work.popleft()
            budget -= item.tokens
            if isinstance(item, Job):
                if not item.future.done():
                    jobs.append(item)
            elif self._live(item):
                chunks.append(item)
        return chunks, jobs

    def _live(self, step: Step) -> bool:
        return not step.future.done() and self._is_open(step.session.key)

    def _forget_groups(self) -> None:
        """Forget the counts of groups no longer queued that are complete; of the incomplete ones (a member may
        still come), keep the most recent `max_groups_kept`."""
        queued = {step.group[0] for step in self._decodes if step.group is not None}
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
            result = await self._run_job(job.fn)
        except Exception as e:
            if not job.future.done():
                job.future.set_exception(e)
            return
        if not job.future.done():
            job.future.set_result(result)

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
