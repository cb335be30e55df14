"""Continuous batching of decode steps on a peer: many sessions' next tokens in one forward.

A decode step (one new token of a one-row session) does not run alone. It joins a queue; the batcher takes every
queued decode step (up to `max_batch_sessions`) and runs them as one batched forward, so the weights are read once
per round instead of once per session. How long it waits for more before starting (at most `batch_wait`):
- a step may say which group of steps it was sent with (`group`: an id and the group's size; our client sends the
  decode steps of its sessions in such groups, see swarm.client.decoding): the batcher waits until every member of
  each group it holds has arrived, and not for anyone else. A client pipelines its sessions through a chain this way
  (one group computes here while another computes on the next peer), which waiting for every decoding session would
  undo by merging the groups;
- a step without a group waits for every session that decodes without groups now (it sent a step in the last
  second), when the batcher was idle: their steps arrive spread out, and a batch started on the first arrivals would
  split them into several smaller forwards for good. Steps arriving during a forward run right after it.
The batcher sleeps on an event between arrivals (no polling). One round is: wait, take, run, count.
"""

from __future__ import annotations

import asyncio
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
class DecodeStep:
    """A decode step waiting for the batcher."""

    session: Any  # swarm.server.backend.Session
    hidden: torch.Tensor  # [1, 1, H]
    position: int
    future: asyncio.Future
    group: tuple[str, int] | None  # (id, size) of the group of steps the client sent it with


# run(steps) → each step's output [1, 1, H], in order: one forward per call (all steps over the same blocks)
RunBatch = Callable[[list[DecodeStep]], Awaitable[list[torch.Tensor]]]


class DecodeBatcher:
    def __init__(self, run: RunBatch, max_batch_sessions: int, batch_wait: float, max_groups_kept: int,
                 is_open: Callable[[Any], bool]):
        self._run_batch, self._is_open = run, is_open
        self.max_batch_sessions, self.batch_wait = max_batch_sessions, batch_wait
        self.max_groups_kept = max_groups_kept  # incomplete groups remembered (a member may still come)
        self._pending: list[DecodeStep] = []
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
        return len(self._pending)

    async def submit(self, step: DecodeStep) -> torch.Tensor:
        loop = asyncio.get_running_loop()
        if step.group is None:
            self._decoding[step.session.key] = loop.time()
        else:
            self._arrived.setdefault(step.group[0], [0, step.group[1]])[0] += 1
        self._pending.append(step)
        self._ensure_running().set()
        return await step.future

    def _ensure_running(self) -> asyncio.Event:
        loop = asyncio.get_running_loop()
        if self._wake is None or self._task is None or self._task.done() or self._task.get_loop() is not loop:
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._loop(), name="decode-batcher")
        return self._wake

    async def _loop(self) -> None:
        idle = True  # steps without a group wait for their peers only when the batcher was idle
        while True:
            idle = await self._wait(idle)
            steps = self._take()
            await self._run(steps)
            self._count(steps)

    async def _wait(self, idle: bool) -> bool:
        """Until steps are queued, then (at most batch_wait) until the ones they announce have come. Returns
        whether the batcher was idle before these steps came."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while not self._pending:
            idle = True
            await self._wake.wait()
            self._wake.clear()
        now = loop.time()
        self._decoding = {k: t for k, t in self._decoding.items() if now - t < UNGROUPED_MEMORY}
        deadline = now + self.batch_wait
        while self._expecting_more(ungrouped=idle) and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._wake.wait()
            self._wake.clear()
        return False

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
