"""Weights shared peer to peer: a peer started with only a content id (`--model sha256:<hex>`) and an empty store
gets the manifest, the config and its span's tensors from the peers that have them, verified against the id, and
serves token-exact; a peer that sends corrupted bytes is caught by hash and banned for fetches; a second fetcher
gets its tensors from two peers, one of which fetched them itself."""

from __future__ import annotations

import ast
import asyncio
import re

import torch
from transformers import AutoModelForCausalLM

from swarm.client import SwarmClient
from swarm.model.manifest import content_id
from tests.e2e.conftest import TINY_PEER_ARGS
from tests.launcher import LocalSwarm
from tests.moving import run_moves, span_bytes
from tests.tiny_models import make_tiny_model


def fetched(proc) -> tuple[int, dict[str, int], str]:
    match = proc.wait_for(r"fetched blocks \d+:\d+: (\d+) bytes from \d+ peer\(s\) in [\d.]+ s (\{[^}]*\}); "
                          r"banned for bad bytes: (.*)")
    return int(match.group(1)), ast.literal_eval(match.group(2)), match.group(3)


async def greedy_equals_transformers(swarm: LocalSwarm, model) -> list[str]:
    """8 greedy tokens through the swarm equal transformers' on the model; the peer ids of the chain taken."""
    client = await SwarmClient.connect(swarm.initial_peers, str(model))
    try:
        await client.wait_for_chain()
        chain = [link.peer.peer_id for link in await client.chain()]
        prompt = torch.tensor([[1, 5, 9, 14, 3]])
        tokens = [int(step.token_ids[0]) async for step in client.generate_steps(prompt, 8)]
    finally:
        await client.close()
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    assert tokens == reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                        do_sample=False, eos_token_id=None)[0, 5:].tolist()
    return chain


async def test_a_peer_with_only_a_content_id_fetches_its_span_verified_and_serves_it(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    cid = content_id(model)
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        liar = swarm.start_peer(str(model), "0:3", *TINY_PEER_ARGS, "--fault-corrupt-fetch")
        honest = swarm.start_peer(str(model), "3:6", *TINY_PEER_ARGS)
        liar_id, honest_id = LocalSwarm.peer_id(liar), LocalSwarm.peer_id(honest)
        first = swarm.start_peer(cid, "3:6", *TINY_PEER_ARGS, env={"SWARM_CACHE_DIR": str(tmp_path / "c1")})
        size, sources, banned = fetched(first)
        assert f"content id {cid}" in first.log()
        assert size > 0 and set(sources) == {liar_id, honest_id}  # several tensors at once: both were asked
        assert liar_id in banned  # its bytes failed their hash
        second = swarm.start_peer(cid, "3:6", *TINY_PEER_ARGS, "--cache-budget", "0.001",
                                  env={"SWARM_CACHE_DIR": str(tmp_path / "c2")})
        size2, sources2, banned2 = fetched(second)
        first_id = LocalSwarm.peer_id(first)
        assert size2 == size and sum(sources2.values()) >= size
        assert first_id in sources2 and honest_id in sources2, sources2  # from two peers, one a fetcher itself
        assert liar_id in banned2
        honest.stop()
        chain = await greedy_equals_transformers(swarm, model)
        assert chain[0] == liar_id and chain[1] in (first_id, LocalSwarm.peer_id(second))


SHARE = ("--share-rate", "0.1", "--throughput", "100")  # every peer sends weights at 0.1 MiB/s: a fetch takes seconds


async def test_a_move_with_prefetch_is_out_of_service_for_a_load_only_and_keeps_the_store_in_budget(
        tiny_model_dir, tmp_path):
    """Peers fetched by content id fill a hole (tests/moving.py): one that prefetches the new span before it drains
    is out of service for less than the fetch takes, one that fetches after (--no-prefetch) for the fetch and more;
    both keep their store within --cache-budget as they move (the span they left is evicted, its shards removed)."""
    model = tiny_model_dir("llama")
    budget = round(1.25 * span_bytes(model, 2) / 2**30, 7)  # a span and a quarter: two do not fit
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        results = run_moves(swarm, model, content_id(model), 2, (*TINY_PEER_ARGS, *SHARE), budget, tmp_path)
    for result in results.values():
        assert result["shards"] == [f"block-{b:05d}.safetensors" for b in range(*result["span"])], result
        size, limit, _ = result["store"][-1]
        assert size <= limit and sum(e for *_, e in result["store"]) > 0, result["store"]  # the old span went
    with_, without = results["prefetch"], results["no-prefetch"]
    print(f"out of service: {with_['gap_s']:.2f} s with prefetch (fetch {with_['fetch_s']:.2f} s before draining), "
          f"{without['gap_s']:.2f} s without (fetch {without['fetch_s']:.2f} s during the gap)")
    assert with_["fetched_before_drain"] and with_["gap_s"] < with_["fetch_s"]
    assert not without["fetched_before_drain"] and without["gap_s"] >= without["fetch_s"]
    assert with_["gap_s"] < without["gap_s"]


async def test_what_no_peer_gives_comes_from_the_model_source_and_a_source_of_other_weights_is_refused(
        tiny_model_dir, tmp_path):
    """The only provider of the model lies: a peer given the content id and `--model-source` bans it, reads its
    span from the source (verified) and serves token-exact; one whose source holds other weights stops with a clear
    error rather than serve them."""
    model = tiny_model_dir("llama")
    cid = content_id(model)
    other = make_tiny_model("llama", tmp_path / "other", seed=1)  # same shapes, other weights
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        liar = swarm.start_peer(str(model), "0:3", *TINY_PEER_ARGS, "--fault-corrupt-fetch")
        liar_id = LocalSwarm.peer_id(liar)
        reader = swarm.start_peer(cid, "3:6", *TINY_PEER_ARGS, "--model-source", str(model),
                                  env={"SWARM_CACHE_DIR": str(tmp_path / "c1")})
        _, sources, banned = fetched(reader)
        assert liar_id in banned and set(sources) <= {liar_id}
        assert f"the rest from the model source {model}" in reader.log()
        # blocks 0:3: the liar is banned, the reader does not hold them; the source is read and refused
        wrong = swarm.start_peer(cid, "0:3", *TINY_PEER_ARGS, "--model-source", str(other), wait=False,
                                 env={"SWARM_CACHE_DIR": str(tmp_path / "c2")})
        assert await asyncio.get_running_loop().run_in_executor(None, wrong.proc.wait, 120) == 2
        assert re.search(rf"the model source {re.escape(str(other))} has content id sha256:[0-9a-f]{{64}}, not "
                         rf"{cid}: refused", wrong.log()), wrong.log()[-2000:]
        assert "Traceback" not in wrong.log()
        await greedy_equals_transformers(swarm, model)
