"""Lockstep groups of decoding sessions: how one client pipelines its sessions through a chain of peers.

A client serving many sessions at once (the gateway is one client for all its requests) has, on each chain of peers,
many sessions that each want one token at a time. Sent independently, their steps reach a peer spread out in time,
so its batcher can only guess how long to wait for the others, and the LM head (SmolLM2's is 113 MB of weights in
float32, read once per call) runs on whichever few rows came back first: measured with 16 sessions on a 2-peer
chain, peers' forwards of 10 rows followed by forwards of 1 to 6, and LM-head calls of 1 row.

`DecodeGroups` sends them in groups instead. Sessions decoding on the same chain are dealt into up to `max_groups`
groups (by default one per peer of the chain, each of at least `min_group` sessions when there are enough). A
group's members advance together, one *round* per token: their embeddings in one call; their steps sent to each peer
together, tagged with the round's id and size (the peer runs them in one forward as soon as all have arrived, and
waits for nobody else: `swarm.server.backend`); one LM-head call for all of them. Different groups are at different
peers at the same time: while one group computes on the second peer the next computes on the first, so the peers of
a chain work at once instead of passing one batch from peer to peer while the others wait.

A group starts its next round once every member has asked for its next token. Members in a round still running are
waited for (at most `join_wait` seconds): a session that starts decoding joins its group's next round instead of
running out of step with it. Members that neither ask nor are in a round (a caller busy elsewhere, a session that
ended) are waited for `straggle` seconds, then left out of the group until they ask again.

A member's failure (a peer failing it over, an error) is its own: the others' results are delivered; a member whose
caller gives up (its future cancelled) has its step cancelled, as it would be without groups.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from swarm.client.grouped import groupable, step_together
from swarm.client.session import InferenceSession
from swarm.protocol import MAX_GROUP_ROWS
from swarm_kernels.sampling import Choice, Sampler, choose_greedy

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Request:
    session: InferenceSession
    input_ids: torch.Tensor  # [1, 1]
    future: asyncio.Future
    since: float
    sampler: Callable[[torch.Tensor], Any] | None = None


@dataclass(eq=False)
class _Group:
    chain: tuple[str, ...]
    # weak: a session its caller dropped (finished, parked and evicted) leaves without telling anyone
    members: weakref.WeakSet[InferenceSession] = field(default_factory=weakref.WeakSet)
    pending: dict[InferenceSession, _Request] = field(default_factory=dict)
    in_flight: set[InferenceSession] = field(default_factory=set)
    timer: asyncio.Handle | None = None
    ended: float = 0.0  # when its last round ended (its members ask again from then on)


class DecodeGroups:
    """Decode steps of one-row sessions, run in lockstep groups per chain (see the module's doc).

    head: the client's LocalHead (`embed`, `logits`); run: runs a blocking function on the client's torch thread.
    A round costs that thread two jobs: the members' embeddings, then their LM head in one call followed by each
    member's sampler on its row. A session is used through `chain_key`, `position`, `closed` and
    `step(hidden, position, group)`.
    """

    def __init__(self, head: Any, run: Callable[..., Awaitable[Any]], max_groups: int | None = None,
                 min_group: int = 2, straggle: float = 0.005, join_wait: float = 0.25, frames: bool = True):
        self.head, self._run = head, run
        self.frames = frames  # a round's steps in group frames where its sessions allow (False: one frame each)
        self.max_groups = max_groups  # None: one per peer of the chain
        self.min_group = min_group
        self.straggle, self.join_wait = straggle, join_wait
        self._groups: dict[tuple[str, ...], list[_Group]] = {}
        self._member_of: weakref.WeakKeyDictionary[InferenceSession, _Group] = weakref.WeakKeyDictionary()
        self._prefix = uuid.uuid4().hex[:16]  # round ids are unique across clients
        self._rounds = itertools.count()
        self._tasks: set[asyncio.Task] = set()
        self.rounds = self.rows = 0  # rounds run and the steps they carried (rows / rounds = mean group)
        self.framed = 0  # of those steps, the ones that went through the chain in group frames (swarm.client.grouped)
        self.solo = 0  # rounds of one step (nothing to put in a group frame)

    def groups(self, chain: tuple[str, ...]) -> list[list[InferenceSession]]:
        """The members of each group with any on `chain` (a session's chain_key), for tests and stats."""
        return [list(group.members) for group in self._groups.get(chain, []) if group.members]

    async def step(self, session: InferenceSession, input_ids: torch.Tensor,
                   sampler: Callable[[torch.Tensor], Any] | None = None) -> tuple[torch.Tensor, Any]:
        """The next token input_ids [1, 1] of `session` (at its position) through the chain → (logits [1, V], what
        `sampler(logits)` chose, or None without a sampler)."""
        loop = asyncio.get_running_loop()
        group = self._group_for(session)
        future = loop.create_future()
        group.pending[session] = _Request(session, input_ids, future, loop.time(), sampler)
        if group.timer is not None:
            group.timer.cancel()
        # decided once the other callers woken with this one (by the same round's end, the same event) have asked
        group.timer = loop.call_soon(self._consider, group)
        return await future

    def _group_for(self, session: InferenceSession) -> _Group:
        chain = session.chain_key
        group = self._member_of.get(session)
        if group is not None and group.chain == chain:
            return group
        if group is not None:  # its chain changed (a peer was replaced): it joins the groups of the new chain
            self._leave(group, session)
        # sessions closed since their group's last round do not count (their callers may still hold them)
        for g in list(self._groups.get(chain, [])):
            for closed in [s for s in g.members if s.closed and s not in g.pending]:
                self._leave(g, closed)
        groups = self._groups.setdefault(chain, [])
        groups[:] = [g for g in groups if g.members or g.pending or g.in_flight]  # emptied by sessions dropped
        members = sum(len(g.members) for g in groups) + 1
        most = self.max_groups or len(chain)
        if len(groups) < min(most, max(1, members // self.min_group)):
            group = _Group(chain)
            groups.append(group)
        else:
            group = min(groups, key=lambda g: len(g.members))
        group.members.add(session)
        self._member_of[session] = group
        return group

    def _leave(self, group: _Group, session: InferenceSession) -> None:
        group.members.discard(session)
        if self._member_of.get(session) is group:
            del self._member_of[session]
        if not group.members and not group.pending and not group.in_flight:
            groups = self._groups.get(group.chain, [])
            if group in groups:
                groups.remove(group)
            if not groups:
                self._groups.pop(group.chain, None)

    def _consider(self, group: _Group) -> None:
        """Start the group's next round if it is due, else set a timer for when it will be."""
        if group.timer is not None:
            group.timer.cancel()
            group.timer = None
        for session, request in list(group.pending.items()):
            if request.future.done():  # its caller gave up
                del group.pending[session]
        for session in [s for s in group.members if s.closed and s not in group.pending]:
            self._leave(group, session)
        if not group.pending:
            return
        now = asyncio.get_running_loop().time()
        first = min(request.since for request in group.pending.values())
        missing = {s for s in group.members if s not in group.pending}
        idle = missing - group.in_flight
        # an idle member gets `straggle` seconds from the later of the first request and the group's last round's
        # end (its members were all busy until then); members in a round, `join_wait` from the first request
        straggle_due = max(first, group.ended) + self.straggle
        if idle and now >= straggle_due:
            for session in idle:
                self._leave(group, session)
            missing -= idle
            idle = set()
        if not missing or now >= first + self.join_wait:
            self._start(group)
            return
        due = min(straggle_due, first + self.join_wait) if idle else first + self.join_wait
        group.timer = asyncio.get_running_loop().call_at(due, self._consider, group)

    def _start(self, group: _Group) -> None:
        requests = list(group.pending.values())
        group.pending.clear()
        group.in_flight.update(r.session for r in requests)
        self.rounds += 1
        self.rows += len(requests)
        self.solo += len(requests) == 1
        task = asyncio.get_running_loop().create_task(self._round(group, requests), name="swarm-decode-round")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _round(self, group: _Group, requests: list[_Request]) -> None:
        tag = (f"{self._prefix}.{next(self._rounds)}", len(requests))
        try:
            embeddings = await self._run(self._embed, requests)
            together = [k for k, r in enumerate(requests) if self.frames and groupable(r.session)][:MAX_GROUP_ROWS]
            if len(together) < 2:
                together = []
            steps: dict[int, asyncio.Future] = {}
            for k, (request, hidden) in enumerate(zip(requests, embeddings, strict=True)):
                if k not in together:
                    steps[k] = self._alone(request, hidden, tag)
            if together:  # in one frame each way per link; a member refused or failed steps alone after
                members = [requests[k] for k in together]
                outs = await step_together([r.session for r in members], torch.cat([embeddings[k] for k in together]),
                                           tag, lambda j: not members[j].future.done())
                self.framed += sum(out is not None for out in outs)
                for k, out in zip(together, outs, strict=True):
                    if out is not None:
                        steps[k] = _resolved(out)
                    elif requests[k].future.done():  # its caller gave up
                        steps[k] = _resolved(asyncio.CancelledError())
                    else:
                        steps[k] = self._alone(requests[k], embeddings[k], None)
            steps = dict(sorted(steps.items()))
            results = await asyncio.gather(*steps.values(), return_exceptions=True)
            done: list[tuple[_Request, torch.Tensor]] = []
            for request, result in zip(requests, results, strict=True):
                if isinstance(result, torch.Tensor):
                    done.append((request, result))
                elif not request.future.done():
                    _fail(request.future, result)
            if done:
                results = await self._run(self._finish, torch.cat([hidden[:, -1:] for _, hidden in done]),
                                          [request.sampler for request, _ in done])
                for (request, _), result in zip(done, results, strict=True):
                    if request.future.done():
                        continue
                    if isinstance(result, Exception):
                        _fail(request.future, result)
                    else:
                        request.future.set_result(result)
        except BaseException as e:
            for request in requests:
                if not request.future.done():
                    _fail(request.future, e)
            raise
        finally:
            group.in_flight.difference_update(r.session for r in requests)
            group.ended = asyncio.get_running_loop().time()
            self._consider(group)

    @staticmethod
    def _alone(request: _Request, hidden: torch.Tensor, tag: tuple[str, int] | None) -> asyncio.Future:
        """A member's step in its own frames (cancelled when its caller gives up)."""
        step = asyncio.ensure_future(request.session.step(hidden, None, tag))
        request.future.add_done_callback(functools.partial(_cancel_with_caller, step))
        return step

    def _embed(self, requests: list[_Request]) -> list[torch.Tensor]:
        """On the torch thread: each member's token embedded at its position (in one call where the head can)."""
        embed_rows = getattr(self.head, "embed_rows", None)
        if embed_rows is not None and len(requests) > 1:
            hidden = embed_rows(torch.cat([r.input_ids for r in requests]), [r.session.position for r in requests])
            return list(hidden.split(1))
        return [self.head.embed(r.input_ids, r.session.position) for r in requests]

    def _finish(self, hidden: torch.Tensor, samplers: list[Callable[[torch.Tensor], Any] | None]
                ) -> list[tuple[torch.Tensor, Any] | Exception]:
        """On the torch thread: the LM head of a round's rows [k, 1, H] in one call, then each row's sampler (one
        that fails, its request's parameters or grammar, fails only its row)."""
        logits = self.head.logits(hidden)[:, -1]
        greedy = _greedy_choices(logits, samplers)
        out: list[tuple[torch.Tensor, Any] | Exception] = []
        for k, (row, sampler) in enumerate(zip(logits.split(1), samplers, strict=True)):
            if k in greedy:
                out.append((row, greedy[k]))
                continue
            try:
                out.append((row, sampler(row) if sampler is not None else None))
            except Exception as e:
                out.append(e)
        return out

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for groups in self._groups.values():
            for group in groups:
                if group.timer is not None:
                    group.timer.cancel()


def _resolved(result: torch.Tensor | BaseException) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    if isinstance(result, asyncio.CancelledError):
        future.cancel()
    elif isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
    return future


def _cancel_with_caller(step: asyncio.Future, caller: asyncio.Future) -> None:
    if caller.cancelled():
        step.cancel()


def _greedy_choices(logits: torch.Tensor, samplers: list[Any]) -> dict[int, Choice]:
    """The choices of a round's rows whose samplers are plain greedy ones (sampling.Sampler.plain_greedy), in one
    pass over the round's logits [k, V] (choose_greedy: the same tokens as each row's sampler); {} where fewer than
    two rows are, or where that call fails (each row's sampler then reports its own error; the failure is logged)."""
    plain = {k for k, sampler in enumerate(samplers) if type(sampler) is Sampler and sampler.plain_greedy}
    if len(plain) < 2:
        return {}
    try:
        tokens = choose_greedy(logits, [sampler.adjust.logit_bias if k in plain else ()
                                        for k, sampler in enumerate(samplers)])
    except Exception:
        _warn_greedy_failed()
        return {}
    return {k: Choice(tokens[k:k + 1]) for k in plain}


@functools.cache
def _warn_greedy_failed() -> None:
    """Logged once a process: every round of the same logits would fail alike."""
    logger.warning("a round's greedy rows could not be chosen together; each row's sampler chooses", exc_info=True)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(error)
