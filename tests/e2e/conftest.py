"""Real local swarms on 127.0.0.1: bootstrap node and peers as processes, started and reaped per test module."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarm.client import SwarmClient
from tests.launcher import LocalSwarm

TINY_PEER_ARGS = ("--idle-timeout", "4", "--announce-period", "1", "--kv-budget-tokens", "4000", "--max-sessions", "16")


@pytest.fixture(scope="module")
def tiny_swarm(tmp_path_factory, tiny_model_dir):
    """The tiny Llama split 0:3 + 3:6, plus an uneven 0:1 + 1:4 + 4:6 set of peers in the same DHT."""
    model = str(tiny_model_dir("llama"))
    with LocalSwarm(tmp_path_factory.mktemp("tiny-swarm")) as swarm:
        swarm.start_bootstrap()
        peers = [swarm.start_peer(model, blocks, *TINY_PEER_ARGS, wait=False)
                 for blocks in ("0:3", "3:6", "0:1", "1:4", "4:6")]
        swarm.peers = {blocks: LocalSwarm.peer_id(p) for blocks, p in zip(("0:3", "3:6", "0:1", "1:4", "4:6"), peers,
                                                                             strict=True)}
        yield swarm


@pytest.fixture(scope="module")
async def tiny_client(tiny_swarm, tiny_model_dir):
    client = await SwarmClient.connect(tiny_swarm.initial_peers, str(tiny_model_dir("llama")))
    await client.wait_for_chain()
    yield client
    await client.close()


async def poll(condition, timeout: float = 15.0, interval: float = 0.1):
    """Await `condition()` (an async callable) until it returns a truthy value; fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await condition()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value {value!r})")
        await asyncio.sleep(interval)


def local_greedy(reference, ids: list[int], new_tokens: int) -> list[int]:
    """The tokens transformers' generate() makes greedily after `ids` (no end-of-text stop)."""
    out = reference.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=None)
    return out[0, len(ids):].tolist()
