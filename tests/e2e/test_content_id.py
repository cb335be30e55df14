"""Peers of one model name that serve other weights are not routed through: each peer announces the content id of
its weights (swarm.model.manifest), a client routes only through peers with its own, and `swarm.status` says so."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swarm.client import SwarmClient
from swarm.dht import get_spans
from swarm.model.manifest import content_id
from swarm.status import render, snapshot
from tests.e2e.conftest import TINY_PEER_ARGS, poll
from tests.launcher import LocalSwarm


@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with one weight of block 4 changed: another model under the same name."""
    copy = tmp_path_factory.mktemp("tuned") / "tiny-llama"
    shutil.copytree(tiny_model_dir("llama"), copy)
    file = next(copy.glob("*.safetensors"))
    tensors = load_file(file)
    tensors["model.layers.4.mlp.down_proj.weight"] += 0.05
    save_file(tensors, file, metadata={"format": "pt"})
    return copy


async def test_a_peer_with_other_weights_under_the_same_name_is_not_routed_through(tiny_model_dir, tuned,
                                                                                  tmp_path):
    model = tiny_model_dir("llama")
    assert content_id(model) != content_id(tuned)
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        first = swarm.start_peer(str(model), "0:3", *TINY_PEER_ARGS)
        other = swarm.start_peer(str(tuned), "3:6", *TINY_PEER_ARGS, "--model-id", "tiny-llama")
        assert f"content id {content_id(tuned)}" in other.log()
        client = await SwarmClient.connect(swarm.initial_peers, str(model))
        try:
            async def both_announced():
                return len(await get_spans(client.dht, "tiny-llama")) == 2

            await poll(both_announced)
            assert await client.missing_blocks(fresh=True) == [(3, 6)]  # the other weights' peer does not count
            ids = {s.peer_id: s.content_id for s in await get_spans(client.dht, "tiny-llama")}
            view = await snapshot(await get_spans(client.dht, "tiny-llama"), "tiny-llama",
                                  lambda peer: _probe(client, peer))
            assert "WEIGHTS DIFFER" in render(view)
            same = swarm.start_peer(str(model), "3:6", *TINY_PEER_ARGS)
            await client.wait_for_chain()
            chain = await client.chain()
            assert [link.peer.peer_id for link in chain] == [LocalSwarm.peer_id(first), LocalSwarm.peer_id(same)]
            assert ids[LocalSwarm.peer_id(other)] == content_id(tuned)
            prompt = torch.tensor([[1, 5, 9, 14, 3]])
            steps = [int(step.token_ids[0]) async for step in client.generate_steps(prompt, 8)]
            reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
            expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                          do_sample=False, eos_token_id=None)[0, 5:].tolist()
            assert steps == expected
        finally:
            await client.close()


async def _probe(client, peer_id):
    import time

    start = time.monotonic()
    info = await client.peer_info(peer_id)
    return info, time.monotonic() - start
