"""A peer that answers plausible but wrong hidden states is caught by verification on another replica, banned, and
failed over by replay: the user's greedy tokens are those of an honest swarm."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client import SwarmClient
from swarm.client.verification import VerificationPolicy
from tests.launcher import LocalSwarm

PROMPT = [7, 100, 33, 250, 12, 5, 480]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=None)
    return out[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, tiny_model_dir):
    """Two honest replicas of the whole tiny model, and a liar claiming to be 1000x faster: routes prefer it
    whatever the round trips of a busy machine (20 ms per block against 0.02)."""
    model = str(tiny_model_dir("llama"))
    with LocalSwarm(tmp_path_factory.mktemp("liar")) as swarm:
        swarm.start_bootstrap()
        honest = [swarm.start_peer(model, "0:6", "--throughput", "50", wait=False) for _ in range(2)]
        # honest for its first forward (the prompt), wrong from the first decode step on
        liar = swarm.start_peer(model, "0:6", "--throughput", "50000", "--fault-wrong-after", "1", wait=False)
        swarm.honest = [LocalSwarm.peer_id(p) for p in honest]
        swarm.liar = LocalSwarm.peer_id(liar)
        yield swarm


async def generate(swarm, model_dir, policy: VerificationPolicy):
    client = await SwarmClient.connect(swarm.initial_peers, str(model_dir), verification=policy)
    try:
        await client.wait_for_chain()
        await client.router.refresh()
        chain = await client.chain()
        session = await client.inference_session(len(PROMPT) + NEW_TOKENS)
        async with session:
            tokens = [int(step.token_ids[0]) async for step in
                      client.generate_steps(torch.tensor([PROMPT]), NEW_TOKENS, session=session)]
        return tokens, chain, session, client.router.banned()
    finally:
        await client.close()


async def test_without_verification_the_liar_wins_the_route_and_the_answer_is_wrong(swarm, tiny_model_dir, expected):
    tokens, chain, session, banned = await generate(swarm, tiny_model_dir("llama"), VerificationPolicy(rate=0))
    assert [link.peer.peer_id for link in chain] == [swarm.liar]  # what verification has to catch
    assert tokens != expected and session.failovers == 0 and not banned


async def test_verification_catches_the_liar_at_its_first_lie_and_the_tokens_are_right(swarm, tiny_model_dir,
                                                                                      expected):
    tokens, chain, session, banned = await generate(swarm, tiny_model_dir("llama"), VerificationPolicy())
    assert [link.peer.peer_id for link in chain] == [swarm.liar]
    assert tokens == expected  # its first wrong answer was checked (a new peer's first steps all are) and redone
    assert session.failovers == 1 and swarm.liar in banned and not set(swarm.honest) & banned
    assert session.streams[0].link.peer.peer_id in swarm.honest
