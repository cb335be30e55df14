"""The tolerance for comparing a swarm's logits with local transformers: measured on this machine's kernels.

Peers and the client compute in float32 with the kernels this CPU takes: oneDNN's prepacked linears where torch has
oneDNN (swarm_kernels/packed.py: the spans' and the LM head's), one decode step at a time over a KV cache, rows of a
decode group batched. The local reference runs transformers with MKL's nn.Linear over the whole sequence at once.
Both are correct float32; they add in different orders, and how far apart that puts the logits depends on the
kernels the CPU runs: a fixed atol of 1e-4 passed on AVX-512 machines and failed on AVX2 ones (1.27e-4), with the
same tokens. Propagating the per-operation bound (swarm_kernels/tolerance.py) through 30 blocks of attention, norms and
softmax would give a bound far too loose to catch anything, so the spread is measured instead:

    spread   the largest |logit difference| between the test's own reference and the same weights run the way the
             peers run them, in this process: a copy of the model with the peers' linears (pack_linears, as
             load_span and the client's head do), prefilling the prompt, then decoding token by token over
             transformers' KV cache, on the same tokens. The only differences left from the swarm are the split
             over peers (hidden states travel bit-exact) and which rows share a forward, which reorders attention
             sums of the same size: on an AVX2 EPYC the swarm's largest differences from transformers on the
             default model were 0.83-0.94x the spread in four runs (9.4e-5 to 1.07e-4 against 1.135e-4), and
             1.0x for a single session of the tiny Llama and for the mixed-precision chain (the same bits).
    atol     SPREAD_FACTOR x spread (2: room for that reordering, twice what was seen), and at least FLOOR_ULPS ulps
             of the largest logit, for tiny models whose two orders happen to agree to the last bit or so.

A real error stays far outside: one block's output off by 1e-3 moved the default model's logits by 1.3e-3 (the last
block) to 1.2e-2 (the first), against an atol of about 2.3e-4 here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from swarm_kernels import packed

SPREAD_FACTOR = 2.0
FLOOR_ULPS = 16

ReferenceLogits = Callable[[torch.nn.Module, torch.Tensor, list[int]], torch.Tensor]


def full_sequence_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: the logits each of `tokens` was chosen from, by one forward over prompt + tokens."""
    ids = torch.cat([prompt_ids, torch.tensor([tokens])], dim=1)
    with torch.inference_mode():
        return model(ids).logits[0, prompt_ids.shape[1] - 1 : -1]


def growing_sequence_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The same, by one forward over the sequence so far per step (the last position's logits)."""
    ids, steps = prompt_ids, []
    with torch.inference_mode():
        for token in tokens:
            steps.append(model(ids).logits[0, -1])
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return torch.stack(steps)


def peer_path_logits(model: torch.nn.Module, prompt_ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """The same logits computed as peers do: prefill the prompt, then one token at a time over a KV cache."""
    with torch.inference_mode():
        out = model(prompt_ids, use_cache=True)
        steps = [out.logits[0, -1]]
        for token in tokens[:-1]:
            out = model(torch.tensor([[token]]), cache=out.cache, use_cache=True)
            steps.append(out.logits[0, -1])
    return torch.stack(steps)


def peer_like_model(path: str | Path) -> torch.nn.Module:
    """The model at `path` in float32 with the linears the swarm runs (oneDNN packed where this torch has it)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if packed.available():
        packed.pack_linears(model)
    return model


def spread(reference: torch.nn.Module, peers: str | Path | torch.nn.Module,
           runs: Sequence[tuple[torch.Tensor, list[int]]],
           reference_logits: ReferenceLogits = full_sequence_logits) -> tuple[float, float]:
    """(largest |difference| between `reference_logits` and the peers' path over every (prompt_ids [1, P], tokens)
    run, largest |logit| seen); `peers`: the model the peers run, or its path (then `peer_like_model`)."""
    peer_like = peers if isinstance(peers, torch.nn.Module) else peer_like_model(peers)
    worst = largest = 0.0
    for prompt_ids, tokens in runs:
        want = reference_logits(reference, prompt_ids, tokens)
        worst = max(worst, (peer_path_logits(peer_like, prompt_ids, tokens) - want).abs().max().item())
        largest = max(largest, want.abs().max().item())
    return worst, largest


def calibrated_atol(reference: torch.nn.Module, peers: str | Path | torch.nn.Module,
                    runs: Sequence[tuple[torch.Tensor, list[int]]],
                    reference_logits: ReferenceLogits = full_sequence_logits) -> float:
    """SPREAD_FACTOR x the spread of these runs on this machine, at least FLOOR_ULPS ulps of the largest logit."""
    measured, largest = spread(reference, peers, runs, reference_logits)
    ulp = torch.finfo(torch.float32).eps * largest
    return max(SPREAD_FACTOR * measured, FLOOR_ULPS * ulp)
