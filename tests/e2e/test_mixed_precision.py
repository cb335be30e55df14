"""Peers of different precisions in one chain, choosing `auto` themselves: what they announce and what they compute.

The default model on this CPU: `--quant auto` gives int4 weights (the checkpoint is GGUF Q4_1), `--quant int8` int8,
`--quant none` fp32. A chain fp32 (0:10) → int8 (10:20) → auto/int4 (20:30) generates what the fp32 chain does: on the
native kernels the same greedy tokens, logits within float rounding: within twice the spread the same two layouts
give in one process here (tests/logits_tolerance.py; tests/e2e/test_quantized_smollm.py measures the formats on a
whole text).
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm_kernels import cpu as kernels_cpu
from swarm_kernels import packed
from swarm_kernels.quant import quantize_linears
from tests.chain_greedy import greedy
from tests.launcher import LocalSwarm
from tests.logits_tolerance import calibrated_atol, peer_like_model, peer_path_logits

LAYOUT = {"0:10": "none", "10:20": "int8", "20:30": "auto"}
PROMPT = "Write a short story about a robot who learns to paint."


@pytest.fixture(scope="module")
def mixed_swarm(tmp_path_factory):
    resolve_model(DEFAULT_MODEL_ID)
    with LocalSwarm(tmp_path_factory.mktemp("mixed")) as swarm:
        swarm.start_bootstrap()
        # the int4 peer shares its kernel calls over 2 threads (the launcher's default is one): the same bits
        procs = {blocks: swarm.start_peer(DEFAULT_MODEL_ID, blocks, "--quant", quant,
                                          *(["--num-threads", "2"] if blocks == "20:30" else []), wait=False)
                 for blocks, quant in [*LAYOUT.items(), ("0:30", "none")]}
        swarm.procs = procs
        swarm.peers = {blocks: LocalSwarm.peer_id(proc) for blocks, proc in procs.items()}
        yield swarm


def mixed_model(path):
    """The model as LAYOUT's chain runs it, in one process: blocks 10:20 int8, 20:30 int4 (what `auto` resolves to
    for the Q4_1 checkpoint), the other linears as the fp32 peers and the client run them."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for i, block in enumerate(model.model.layers):
        if i >= 10:
            quantize_linears(block, "int8" if i < 20 else "int4")
    if packed.available():
        packed.pack_linears(model)
    return model


async def test_peers_announce_their_precision_and_a_mixed_chain_computes_close_to_fp32(mixed_swarm):
    client = await SwarmClient.connect(mixed_swarm.initial_peers)
    try:
        spans = {s.peer_id: s for s in await client.spans()}
        announced = {blocks: (spans[mixed_swarm.peers[blocks]].device, spans[mixed_swarm.peers[blocks]].dtype,
                              spans[mixed_swarm.peers[blocks]].quant) for blocks in mixed_swarm.peers}
        assert announced == {"0:10": ("cpu", "float32", "none"), "10:20": ("cpu", "float32", "int8"),
                             "20:30": ("cpu", "float32", "int4"), "0:30": ("cpu", "float32", "none")}
        if kernels_cpu.available() and sys.platform == "linux":
            assert "computing with 1 torch thread(s), 2 native kernel thread(s)" in mixed_swarm.procs["20:30"].log()
            assert "computing with 1 torch thread(s), 1 native kernel thread(s)" in mixed_swarm.procs["10:20"].log()
        mixed = [Link(spans[mixed_swarm.peers[b]], *map(int, b.split(":"))) for b in LAYOUT]
        full = [Link(spans[mixed_swarm.peers["0:30"]], 0, 30)]
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL_ID).path)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                            return_tensors="pt")["input_ids"]
        tokens_mixed, logits_mixed = await greedy(client, mixed, ids, 16)
        tokens_full, logits_full = await greedy(client, full, ids, 16)
        print("max |logit diff| per step:", (logits_mixed - logits_full).abs().amax(-1).tolist())
        if kernels_cpu.available():
            # the native kernels keep float32 activations and re-express the Q4_1 checkpoint exactly (int8 and int4
            # groups of 32): the mixed chain is the fp32 chain up to float rounding, as far apart as the two layouts
            # are in one process (through the swarm: 6.4e-5 on an AVX2 EPYC, the same bits as in one process)
            assert tokens_mixed == tokens_full
            path = resolve_model(DEFAULT_MODEL_ID).path
            atol = calibrated_atol(peer_like_model(path), mixed_model(path), [(ids, tokens_full)], peer_path_logits)
            torch.testing.assert_close(logits_mixed, logits_full, atol=atol, rtol=0)
        else:  # torch's bf16 kernels: the same distributions up to quantization error
            assert tokens_mixed[:4] == tokens_full[:4]
            for mixed_step, full_step in zip(logits_mixed[:4], logits_full[:4], strict=True):
                assert len(set(mixed_step.topk(5).indices.tolist()) & set(full_step.topk(5).indices.tolist())) >= 3
                assert (mixed_step - full_step).abs().max() < 0.5 * full_step.std()
    finally:
        await client.close()
