"""Families beyond Llama through real peers: each tiny model split across 2 peer processes (0:3 + 3:6) generates the
same greedy tokens as transformers runs it locally, and every step's logits match.

The in-process split-vs-whole check of every supported family is tests/unit/test_span.py; these go through the
whole stack because each exercises a different family mechanism end to end: learned absolute positions in the
client's head (gpt2), sliding-window layers shorter than the sequence plus final logit soft-capping and eager
attention (gemma2), a rotary module per layer type (gemma3_text), checkpoints whose expert tensors transformers fuses
on load (mixtral, qwen2_moe: the peers read a canonical copy), and a layer argument the peer passes as None (falcon's
alibi). The default run takes three of them (6 peer processes, about 30 s on 2 cores); the other three are marked
slow (`make test-all`).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client import SwarmClient
from tests.e2e.conftest import TINY_PEER_ARGS
from tests.launcher import LocalSwarm
from tests.logits_tolerance import calibrated_atol, growing_sequence_logits

FAMILIES = ("gpt2", "gemma2", "mixtral")  # absolute positions, sliding windows + soft-capping, fused experts
MORE_FAMILIES = ("falcon", "gemma3_text", "qwen2_moe")  # slow: alibi as None, per-layer-type rotary, fused experts


def two_peers_each(tmp_path, tiny_model_dir, families):
    swarm = LocalSwarm(tmp_path)
    try:
        swarm.start_bootstrap()
        procs = [swarm.start_peer(str(tiny_model_dir(family)), blocks, *TINY_PEER_ARGS, wait=False)
                 for family in families for blocks in ("0:3", "3:6")]
        for proc in procs:
            LocalSwarm.peer_id(proc)  # waits until it announced
    except BaseException:
        swarm.stop()
        raise
    return swarm


@pytest.fixture(scope="module")
def family_swarm(tmp_path_factory, tiny_model_dir):
    with two_peers_each(tmp_path_factory.mktemp("families"), tiny_model_dir, FAMILIES) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def more_family_swarm(tmp_path_factory, tiny_model_dir):
    with two_peers_each(tmp_path_factory.mktemp("more-families"), tiny_model_dir, MORE_FAMILIES) as swarm:
        yield swarm


@pytest.mark.parametrize("family", FAMILIES)
async def test_family_through_two_peers_equals_transformers(family_swarm, tiny_model_dir, family):
    await check_family(family_swarm, tiny_model_dir, family)


@pytest.mark.slow
@pytest.mark.parametrize("family", MORE_FAMILIES)
async def test_more_families_through_two_peers_equal_transformers(more_family_swarm, tiny_model_dir, family):
    await check_family(more_family_swarm, tiny_model_dir, family)


async def check_family(swarm, tiny_model_dir, family: str) -> None:
    path = tiny_model_dir(family)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    client = await SwarmClient.connect(swarm.initial_peers, str(path))
    try:
        await client.wait_for_chain()
        ids = torch.randint(2, 512, (1, 9), generator=torch.Generator().manual_seed(7))
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=None)
        expected = out[0, ids.shape[1]:].tolist()
        # the float32 spread of this machine's kernels on this very run (tests/logits_tolerance.py)
        atol = calibrated_atol(reference, path, [(ids, expected)], growing_sequence_logits)
        tokens, steps = [], ids
        async for step in client.generate_steps(ids, 12):
            with torch.inference_mode():
                torch.testing.assert_close(step.logits, reference(steps).logits[:, -1], atol=atol, rtol=0)
            tokens.append(int(step.token_ids[0]))
            steps = torch.cat([steps, step.token_ids[:, None]], dim=1)
        assert tokens == expected
    finally:
        await client.close()
