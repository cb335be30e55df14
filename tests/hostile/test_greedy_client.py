"""A greedy client cannot lock others out of a peer: when another client wants capacity, the greedy one is cut down
to its fair share (capacity / clients using the peer), and only its sessions pay.

Against a real peer process (--max-sessions 8, --kv-budget-tokens 1024, --admission-wait 30), one client takes all
of one resource and holds it: every session slot (8 idle sessions), or the whole KV budget (4 sessions of 256
prefilled tokens). Another client must then open a session within 15 s and generate the tokens transformers does.
Why 15 s: before this bound existed the other client waited the whole admission wait (30 s) and was refused; the
peer now makes room at once (it hands off the greedy client's longest-idle session), and the rest is one open and a
few steps of a tiny model (well under a second, even on two busy cores). While the other client holds its session,
the greedy client's next open (or growth) is refused at once with a `capacity` error, and the greedy client's
sessions that were handed off answer `capacity` too; the other client's never does.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.stream import PeerStream
from swarm.protocol import ErrorCode, OpenRequest, PeerError
from tests.e2e.conftest import local_greedy, poll
from tests.hostile.tiny_peer import clients_of, tiny_peer

MAX_SESSIONS, BUDGET, ADMISSION_WAIT = 8, 1024, 30.0
SERVED_WITHIN = 15.0  # see the module's doc
NEW_TOKENS = 8
PROMPTS = {"sessions": [7, 100, 33, 250, 12, 5, 480],  # fits the 128 tokens reserved at the open
           "kv": [(7 * i + 3) % 500 + 2 for i in range(130)]}  # grows past them while the budget is contended


@pytest.fixture(scope="module")
def peer(tmp_path_factory, tiny_model_dir):
    flags = ["--max-sessions", str(MAX_SESSIONS), "--kv-budget-tokens", str(BUDGET),
             "--admission-wait", str(ADMISSION_WAIT), "--announce-period", "1"]
    with tiny_peer(tmp_path_factory.mktemp("greedy"), tiny_model_dir("llama"), *flags) as swarm:
        yield swarm


@pytest.fixture(scope="module")
async def clients(peer, tiny_model_dir):
    """(greedy, other): two clients, two peer ids."""
    async with clients_of(peer, tiny_model_dir("llama"), 2) as made:
        yield made


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()


def expected(reference, prompt: list[int]) -> list[int]:
    return local_greedy(reference, prompt, NEW_TOKENS)


class Greedy:
    """Sessions held by hand (no router: a refusal is raised, never failed over), each at its own position."""

    def __init__(self, client: SwarmClient, peer_id: str):
        self.client, self.peer_id = client, peer_id
        self.held: list[tuple[PeerStream, int]] = []
        self.gone: list[PeerStream] = []  # refused: no longer stepped

    async def open(self, max_length: int, prefill: int) -> None:
        span = next(s for s in await self.client.spans() if s.peer_id == self.peer_id)
        request = OpenRequest(f"greedy-{len(self.held)}", max_length=max_length, batch_size=1, start=0, end=6)
        stream = await PeerStream.open(self.client.p2p, Link(span, 0, 6), request, timeout=2 * ADMISSION_WAIT)
        await stream.step(torch.randn(1, prefill, 64), 0, timeout=30)
        self.held.append((stream, prefill))

    async def step_all(self) -> list[PeerError]:
        """One more token in every session; the refusals."""
        refused = []
        for stream, position in self.held:
            try:
                await stream.step(torch.randn(1, 1, 64), position, timeout=30)
            except PeerError as e:
                refused.append(e)
        return refused

    async def close(self) -> None:
        for stream in [*self.gone, *(stream for stream, _ in self.held)]:
            await stream.close()


async def all_free(client: SwarmClient, peer_id: str) -> bool:
    info = await client.peer_info(peer_id)
    return info.active_sessions == 0 and info.free_kv_tokens == info.kv_budget_tokens


@pytest.mark.parametrize("resource", ["sessions", "kv"])
async def test_a_greedy_client_is_cut_to_its_share_and_the_other_client_is_served(peer, clients, reference, resource):
    greedy_client, other = clients
    greedy = Greedy(greedy_client, peer.peer)
    prompt = PROMPTS[resource]
    try:
        if resource == "sessions":  # every session slot, each small
            for _ in range(MAX_SESSIONS):
                await greedy.open(max_length=64, prefill=8)
        else:  # the whole KV budget, in few sessions
            for _ in range(BUDGET // 256):
                await greedy.open(max_length=512, prefill=256)
        info = await other.peer_info(peer.peer)
        assert info.active_sessions == MAX_SESSIONS or info.free_kv_tokens == 0, info  # really all of it

        async with asyncio.timeout(SERVED_WITHIN):
            session = await other.inference_session(len(prompt) + NEW_TOKENS)
        async with session:
            # the greedy client now shares the peer with a client that holds a session: past its share, refused
            with pytest.raises(PeerError) as refusal:
                async with asyncio.timeout(ADMISSION_WAIT / 3):  # at once, not after the admission wait
                    if resource == "sessions":
                        await greedy.open(max_length=64, prefill=8)
                    else:  # grow a held session by another 256 tokens: the session is refused (and ends)
                        stream, position = greedy.held.pop()
                        greedy.gone.append(stream)
                        await stream.step(torch.randn(1, 256, 64), position, timeout=ADMISSION_WAIT)
            assert refusal.value.code == ErrorCode.CAPACITY, refusal.value
            async with asyncio.timeout(SERVED_WITHIN):
                steps = other.generate_steps(torch.tensor([prompt]), NEW_TOKENS, session=session)
                tokens = [int(step.token_ids[0]) async for step in steps]
            assert tokens == expected(reference, prompt)
            assert session.failovers == 0  # the other client was never refused nor handed off
        refused = await greedy.step_all()
        assert refused and all(e.code == ErrorCode.CAPACITY for e in refused), refused
        # only what exceeded its share: of 8 slots (or 4 sessions of a quarter of the budget) it keeps at least half
        assert len(refused) <= len(greedy.held) // 2
    finally:
        await greedy.close()
    await poll(lambda: all_free(other, peer.peer))
