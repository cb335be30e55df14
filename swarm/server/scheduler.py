"""What a peer's compute thread runs next: batched decode steps and chunks of everything else, interleaved.

Decode steps (one new token of a one-row session) are batched: they join a queue, and one forward runs every queued
decode step (up to `max_batch_sessions`), so the weights are read once per round instead of once per session. How
long a batch may wait for more before starting (at most `batch_wait`):
- a step may say which group of steps it was sent with (`group`: an id and the group's size; our client sends the
  decode steps of its sessions in such groups, see swarm.client.decoding): the batch waits until every member of
  each group it holds has arrived, and not for anyone else. A client pipelines its sessions through a chain this way
  (one group computes here while another computes on the next peer), which waiting for every decoding session would
  undo by merging the groups;
- a step without a group waits for every session that decodes without groups now (it sent a step in the last
  second), when the scheduler was idle: their steps arrive spread out, and a batch started on the first arrivals
  would split them into several smaller forwards for good. Steps arriving during a forward run right after it.

Everything else is a job: a prefill chunk (at most `prefill_chunk` tokens of a prompt), a step of a session of
several rows, an encoder's input. Jobs run one forward each, first come first served; a long prompt is several
jobs, submitted one after the other, so other prompts' chunks run between its chunks. A round runs the ready decode
batch, then jobs up to `job_tokens` tokens (at least one): decode steps never wait behind more than one round of
prefill, and a prefill never waits for a decode batch's late members (jobs run while the batch waits for them).
The scheduler sleeps on an event between arrivals (no polling).
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


@dataclass
class Job:
    """Any other compute for the thread: run() is called there; its result or exception goes to `future`."""

    run: Callable[[], torch.Tensor]
    tokens: int  # rows x new tokens, for the round's budget
    future: asyncio.Future


@dataclass
class DecodeStep:
    """A decode step waiting for the batcher."""

    session: Any  # swarm.server.backend.Session
    hidden: torch.Tensor  # [1, 1, H]
    position: int
    future: asyncio.Future
    group: tuple[str, int] | None  # (id, size) of the group of steps the client sent it with


# run(steps) → each step's output [1, 1, H], in order: one forward per call (all steps over the same blocks)
RunBatch = Callable[[list[DecodeStep]], Awaitable[list[torch.Tensor]]]


class Scheduler:
    """run_batch(steps): one decode forward on the compute thread; run_job(fn): fn() on the compute thread."""

    def __init__(self, run_batch: RunBatch, run_job: Callable[[Callable[[], torch.Tensor]], Awaitable[torch.Tensor]],
                 max_batch_sessions: int, batch_wait: float, job_tokens: int, max_groups_kept: int,
                 is_open: Callable[[Any], bool]):
        self._run_batch, self._run_job, self._is_open = run_batch, run_job, is_open
        self.max_batch_sessions, self.batch_wait, self.job_tokens = max_batch_sessions, batch_wait, job_tokens
        self.max_groups_kept = max_groups_kept  # incomplete groups remembered (a member may still come)
        self._pending: list[DecodeStep] = []
        self._jobs: collections.deque[Job] = collections.deque()
        self._deadline: float | None = None  # when the queued decode steps stop waiting for more
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._decoding: dict[str, float] = {}  # session key → when it last sent a decode step without a group
        # group id → [its steps arrived so far, its size]: a group larger than max_batch_sessions runs as several
        # forwards, and its later members must not wait for those already computed
        self._arrived: dict[str, list[int]] = {}
        self.forwards = self.rows = 0  # forwards run and the session steps they carried (rows / forwards = mean)
        self.batch_sizes: list[int] = []  # every multi-row forward's size (recent ones), for tests and stats
        self._logged = (0.0, 0, 0)  # (when, forwards, rows) at the last batching log line

    @property
    def queued(self) -> int:
        return len(self._pending) + len(self._jobs)

    async def submit(self, step: DecodeStep) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if step.group is None:
            self._decoding[step.session.key] = loop.time()
        else:
            self._arrived.setdefault(step.group[0], [0, step.group[1]])[0] += 1
        self._pending.append(step)
        self._ensure_running().set()
        return await step.future

    async def run(self, fn: Callable[[], torch.Tensor], tokens: int) -> torch.Tensor:
        """fn() on the compute thread, in its turn among the jobs (see the module's doc)."""
        job = Job(fn, tokens, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._ensure_running().set()
        return await job.future

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
            if self._pending and (not self._expecting_more(idle) or self._waited_enough()):
                steps = self._take()
                await self._run(steps)
                self._count(steps)
                idle = False
            await self._run_jobs()

    async def _wait(self, idle: bool) -> bool:
        """Until jobs are queued, or decode steps are queued and the ones they announce have come (at most
        batch_wait). Returns whether the scheduler was idle before this work came."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not self._pending and not self._jobs:
            idle = True
            await self._wake.wait()
            self._wake.clear()
        if self._pending and self._deadline is None:
            now = loop.time()
            self._decoding = {k: t for k, t in self._decoding.items() if now - t < UNGROUPED_MEMORY}
            self._deadline = now + self.batch_wait
        while not self._jobs and self._expecting_more(idle) and not self._waited_enough():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(self._deadline or loop.time()):
                    await self._wake.wait()
            self._wake.clear()
        return idle

    def _waited_enough(self) -> bool:
        return self._deadline is not None and asyncio.get_running_loop().time() >= self._deadline

    async def _run_jobs(self) -> None:
        """Jobs up to the round's token budget, at least one (first come first served)."""
        budget = self.job_tokens
        while self._jobs and budget > 0:
            job = self._jobs.popleft()
            budget -= job.tokens
            if job.future.done():  # its caller gave up
                continue
            try:
                result = await self._run_job(job.run)
            except Exception as e:
                if not job.future.done():
                    job.future.set_exception(e)
                continue
            if not job.future.done():
                job.future.set_result(result)

    def _expecting_more(self, ungrouped: bool) -> bool:
        """Whether queued steps announce more that should join their forward: members of a queued step's group not
        here yet, or (`ungrouped`: for steps without a group) sessions decoding without groups that have not sent
        theirs."""
        pending = self._pending
        if len(pending) >= self.max_batch_sessions:
            return False
        sizes = {step.group[0]: step.group[1] for step in pending if step.group is not None}
        if any(self._arrived.get(key, [0])[0] < size for key, size in sizes.items()):
            return True
        alone = sum(step.group is None for step in pending)
        decoding = sum(1 for key in self._decoding if self._is_open(key))
        return ungrouped and 0 < alone < decoding

    def _take(self) -> list[DecodeStep]:
        taken = self._pending[: self.max_batch_sessions]
        del self._pending[: len(taken)]
        self._deadline = None  # the steps left (a group larger than a forward) start a new wait
        self._forget_groups()
        return [step for step in taken if not step.future.done() and self._is_open(step.session.key)]

    def _forget_groups(self) -> None:
        """Forget the counts of groups no longer queued that are complete; of the incomplete ones (a member may
        still come), keep the most recent `max_groups_kept`."""
        queued = {step.group[0] for step in self._pending if step.group is not None}
        kept = {key: c for key, c in self._arrived.items() if key in queued or c[0] < c[1]}
        waiting = [key for key in kept if key not in queued]  # oldest first
        for key in waiting[: max(0, len(waiting) - self.max_groups_kept)]:
            del kept[key]
        self._arrived = kept

    async def _run(self, steps: list[DecodeStep]) -> None:
        """One forward per part of the span the steps' sessions cover; each step gets its row or the error."""
        by_blocks: dict[tuple[int, int], list[DecodeStep]] = {}
        for step in steps:
            blocks = step.session.blocks
            by_blocks.setdefault((blocks.start, blocks.stop), []).append(step)
        for batch in by_blocks.values():
            self.forwards += 1
            try:
                outputs = await self._run_batch(batch)
            except Exception as e:
                for step in batch:
                    if not step.future.done():
                        step.future.set_exception(e)
                continue
            for step, out in zip(batch, outputs, strict=True):
                if not step.future.done():
                    step.future.set_result(out)
            if len(batch) > 1:
                self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]

    def _count(self, steps: list[DecodeStep]) -> None:
        self.rows += len(steps)
        now = asyncio.get_running_loop().time()
        when, forwards, rows = self._logged
        if now - when > LOG_PERIOD and self.forwards > forwards:
            logger.info("decode batching: %.1f sessions per forward on average over %d forwards",
                        (self.rows - rows) / (self.forwards - forwards), self.forwards - forwards)
            self._logged = (now, self.forwards, self.rows)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for step in self._pending:
            if not step.future.done():
                step.future.cancel()
        self._pending.clear()
        for job in self._jobs:
            if not job.future.done():
                job.future.cancel()
        self._jobs.clear()
