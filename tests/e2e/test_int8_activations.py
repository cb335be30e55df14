"""A peer started with `--activations int8`: it announces it, and the swarm generates what the same code gives in
this process (the default model's 30 int4 blocks on swarm_kernels/cpu_a8.c, the client's head), not what float32
activations give.

The reference is the peer's own code path (load_span: a prefill, then one token at a time through the lean decode
path), not transformers' layers: int8 activations round each activation to a grid, so a last-bit difference between
two float orders of the attention or the norms (the lean path's against transformers') can move one across a grid
boundary, and through 30 blocks that moved the default model's logits by up to ~1.3 (a token flipped at a 0.12
margin) where float32 activations stay within ~4e-4. What int8 activations cost against float32 is measured on a whole
text in tests/e2e/test_quantized_smollm.py."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.model.head import load_head
from swarm.model.precision import Precision
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.model.span import load_span
from swarm_kernels import cpu, cpu_a8
from tests.chain_greedy import greedy
from tests.launcher import LocalSwarm

PROMPT = "Write a short story about a robot who learns to paint."
STEPS = 16

pytestmark = pytest.mark.skipif(not cpu_a8.available(), reason="no working C compiler for swarm_kernels/cpu_a8.c")


def span_path_logits(source, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: the logits each token was chosen from, computed as the peer and the client do, in process."""
    head = load_head(source)
    span = load_span(source, 0, 30, precision=Precision("cpu", torch.float32, "int4"))
    assert span.kernels() == {"native"}
    cache = span.new_cache(ids.shape[1] + len(tokens))
    with torch.inference_mode():
        hidden = span(head.embed(ids), cache, 0)
        steps = [head.logits(hidden[:, -1:]).reshape(-1)]
        for position, token in enumerate(tokens[:-1], start=ids.shape[1]):
            hidden = span(head.embed(torch.tensor([[token]])), cache, position)
            steps.append(head.logits(hidden).reshape(-1))
    return torch.stack(steps)


async def test_a_peer_with_int8_activations_generates_what_that_arithmetic_gives(tmp_path):
    path = resolve_model(DEFAULT_MODEL_ID).path
    with LocalSwarm(tmp_path) as swarm:
        swarm.start_bootstrap()
        proc = swarm.start_peer(DEFAULT_MODEL_ID, "0:30", "--quant", "int4", "--activations", "int8",
                                "--num-threads", "2")
        assert "; int8 activations" in proc.log()
        client = await SwarmClient.connect(swarm.initial_peers)
        try:
            (span,) = await client.spans()
            assert (span.quant, span.activations) == ("int4", "int8")
            tokenizer = AutoTokenizer.from_pretrained(path)
            ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                return_tensors="pt")["input_ids"]
            tokens, logits = await greedy(client, [Link(span, 0, 30)], ids, STEPS)
        finally:
            await client.close()
    source = resolve_model(DEFAULT_MODEL_ID)
    saved = cpu.activations()
    try:
        cpu.set_activations("int8")
        local = span_path_logits(source, ids, tokens)
        cpu.set_activations("float32")
        floats = span_path_logits(source, ids, tokens)
    finally:
        cpu.set_activations(saved)
    assert tokens == local.argmax(-1).tolist()
    apart, from_floats = (logits - local).abs().max().item(), (logits - floats).abs().max().item()
    print(f"max |logit diff|: swarm vs in process with int8 activations {apart:.3g}, with float32 {from_floats:.3g}")
    # the same code and kernels on both sides: only the head's and the wire's float32 (bit-exact) differ; float32
    # activations are ~1 logit away
    assert apart < 1e-3 and from_floats > 0.1
