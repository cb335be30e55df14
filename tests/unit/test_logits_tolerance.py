"""tests/logits_tolerance.py: the calibrated logits tolerance admits what peers compute and refuses a real error.

In one process on the tiny Llama: the swarm's own compute path (load_span + load_head, decode rows batched as a
group) stays within the tolerance calibrated on transformers' incremental decoding, and one block's output off by
1e-3 (the kind of error a broken kernel or cache makes) falls outside it at either end of the model.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.model.head import load_head
from swarm.model.source import ModelSource
from swarm.model.span import load_span
from tests import logits_tolerance

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    path = tiny_model_dir("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runs = []
    for seed in (1, 2):
        ids = torch.randint(2, 512, (1, 7), generator=torch.Generator().manual_seed(seed))
        out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=None)
        runs.append((ids, out[0, ids.shape[1]:].tolist()))
    atol = logits_tolerance.calibrated_atol(reference, path, runs)
    return path, reference, runs, atol


def test_the_swarms_batched_decode_path_is_within_the_calibrated_tolerance(setup):
    path, reference, runs, atol = setup
    source = ModelSource("tiny", path)
    head, spans = load_head(source), [load_span(source, 0, 3), load_span(source, 3, 6)]
    caches = [[span.new_cache(64) for _ in runs] for span in spans]
    logits = [[] for _ in runs]
    for row, (ids, _) in enumerate(runs):  # each session's prefill, then their decode steps as one group
        hidden = head.embed(ids)
        for span, span_caches in zip(spans, caches, strict=True):
            hidden = span(hidden, span_caches[row], 0)
        logits[row].append(head.logits(hidden[:, -1:])[0, 0])
    for step in range(NEW_TOKENS - 1):
        hidden = torch.cat([head.embed(torch.tensor([[tokens[step]]])) for _, tokens in runs])
        positions = [ids.shape[1] + step for ids, _ in runs]
        for span, span_caches in zip(spans, caches, strict=True):
            hidden = span.forward_batch(hidden, span_caches, positions)
        for row, row_logits in enumerate(head.logits(hidden)[:, 0]):
            logits[row].append(row_logits)
    for (ids, tokens), row_logits in zip(runs, logits, strict=True):
        want = logits_tolerance.full_sequence_logits(reference, ids, tokens)
        torch.testing.assert_close(torch.stack(row_logits), want, atol=atol, rtol=0)


@pytest.mark.parametrize("block", [0, 5])
def test_one_block_off_by_1e_3_exceeds_the_calibrated_tolerance(setup, block):
    path, reference, runs, atol = setup
    model = logits_tolerance.peer_like_model(path)

    def off(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        return (hidden + 1e-3, *output[1:]) if isinstance(output, tuple) else hidden + 1e-3

    model.model.layers[block].register_forward_hook(off)
    worst = max((logits_tolerance.peer_path_logits(model, ids, tokens)
                 - logits_tolerance.full_sequence_logits(reference, ids, tokens)).abs().max().item()
                for ids, tokens in runs)
    assert worst > atol, (worst, atol)
