"""Group frames: a lockstep group's decode steps through a chain in one frame each way per link.

    taken = groupable(session)                                   # may its next decode step travel in a group frame?
    outs = await step_together(sessions, hidden, tag, wanted)   # hidden [k, 1, H] → per session [1, 1, H] or None

A group of one-row sessions decoding on the same chain (swarm.client.decoding) would send every peer one frame per
session and read one back. Sent together, the rows travel in one `group_step` frame per link on one member's stream
(swarm.protocol), and the peer answers them all in one frame: per round one message to parse, validate and serialize
on each side instead of one per session. Each member still keeps its inputs for replay, feeds the router its link
latencies and has its steps verified as if it had stepped alone; a member whose row a peer refused, or whose check
failed, or all of them when the frame fails (the carrying stream's peer failed, answered malformed), get None and
step alone (InferenceSession.step: errors, failover and bans as without groups). Sessions that push from peer to peer
(a chain of several peers taking pushes) step alone: their own frames already skip the client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import torch

from swarm.client.session import InferenceSession
from swarm.protocol import PeerError


def groupable(session: InferenceSession) -> bool:
    """Whether the session's next decode step may travel in a group frame."""
    return (not session.closed and session.batch_size == 1 and not session.pushing and session.repair_due is None
            and all(stream.handle is not None and not stream.closed for stream in session.streams))


async def step_together(sessions: list[InferenceSession], hidden: torch.Tensor, group: tuple[str, int],
                        wanted: Callable[[int], bool] = lambda j: True) -> list[torch.Tensor | None]:
    """The next token of every session (row j of hidden [k, 1, H] is session j's, at its position; all on one
    chain, each `groupable`) through the chain in group frames → each session's output [1, 1, H], or None for a
    session to step alone. `group`: the round's tag, as its members stepping alone send it. A session stands after
    its step only if `wanted(j)` still holds when the step ends (its caller may have given up meanwhile; the peers
    rewind at its next step)."""
    results: list[torch.Tensor | None] = [None] * len(sessions)
    positions = [session.position for session in sessions]
    chain = sessions[0].chain_key
    live = [j for j, session in enumerate(sessions) if session.chain_key == chain and groupable(session)]
    if not live:
        return results
    current = hidden[live]
    for i in range(len(sessions[live[0]].streams)):
        carrier = sessions[live[0]]
        handles = [handle for j in live if (handle := sessions[j].streams[i].handle) is not None]
        if len(handles) != len(live):
            return results
        started = time.monotonic()
        try:
            out, taken = await carrier.streams[i].group_step(current, handles, [positions[j] for j in live], group,
                                                             carrier.link_timeout(i, 1), carrier.link_probe(i, 1))
        except PeerError:
            return results  # each steps alone: the carrier finds out what failed, and fails over
        seconds = time.monotonic() - started
        rows = [r for r, ok in enumerate(taken) if ok]
        for r in rows:
            sessions[live[r]].remember(i, current[r : r + 1], positions[live[r]], seconds)
        due = [r for r in rows if sessions[live[r]].verify_due(i)]  # drawn first, in row order: most rounds
        # check no row, and only the rows drawn get a coroutine
        checks = await asyncio.gather(*(sessions[live[r]].check(i, current[r : r + 1], positions[live[r]],
                                                                out[r : r + 1]) for r in due),
                                      return_exceptions=True) if due else []
        for check in checks:
            if isinstance(check, BaseException) and not isinstance(check, PeerError):
                raise check
        failed = {r for r, check in zip(due, checks, strict=True) if check is not None}  # a PeerError: alone
        rows = [r for r in rows if r not in failed]
        live, current = [live[r] for r in rows], out[rows]
        if not live:
            return results
    for r, j in enumerate(live):
        if wanted(j) and not sessions[j].closed and sessions[j].position == positions[j]:
            sessions[j].position = positions[j] + 1
            results[j] = current[r : r + 1]
    return results
