"""A tiny model's peer process of its own, and clients of it: what the hostile peer tests attack."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

from swarm.client import SwarmClient
from tests.launcher import LocalSwarm


@contextlib.contextmanager
def tiny_peer(workdir, model_dir, *flags: str) -> Iterator[LocalSwarm]:
    """A bootstrap node and one peer serving every block of the tiny llama at `model_dir` with `flags`; the swarm's
    `peer` is that peer's id."""
    with LocalSwarm(workdir) as swarm:
        swarm.start_bootstrap()
        swarm.peer = LocalSwarm.peer_id(swarm.start_peer(str(model_dir), "0:6", *flags))
        yield swarm


@contextlib.asynccontextmanager
async def clients_of(swarm: LocalSwarm, model_dir, count: int) -> AsyncIterator[list[SwarmClient]]:
    """`count` clients of the swarm, each with a peer id of its own, once each sees a chain."""
    made = [await SwarmClient.connect(swarm.initial_peers, str(model_dir)) for _ in range(count)]
    try:
        for client in made:
            await client.wait_for_chain()
        yield made
    finally:
        for client in made:
            await client.close()
