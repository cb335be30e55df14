"""Greedy decoding through a chosen chain of peers, keeping the logits each token was chosen from."""

from __future__ import annotations

import torch

from swarm.client.session import InferenceSession


async def greedy(client, chain, ids: torch.Tensor, steps: int) -> tuple[list[int], torch.Tensor]:
    """(tokens, logits [steps, V]): `steps` greedy tokens after the prompt `ids` [1, P] through `chain` (Links)."""
    logits_per_step, tokens = [], []
    session = await InferenceSession.open(client.p2p, chain, max_length=ids.shape[1] + steps)
    async with session:
        logits = await client.prefill(session, ids)
        for _ in range(steps):
            logits_per_step.append(logits.reshape(-1))
            tokens.append(int(logits.argmax()))
            logits = await client.decode(session, torch.tensor([tokens[-1]]))
    return tokens, torch.stack(logits_per_step)
