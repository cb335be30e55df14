"""Timed greedy runs shared by the benchmarks: local transformers, a swarm chain, with end-of-text suppressed.

Each run returns (ttft_s, decode_tok_s, tokens). TTFT covers everything a user waits for before the first token
(for the swarm: opening the session on every peer, the prefill through the chain, the head); decode tok/s is
(new_tokens - 1) / time from the first to the last token.
"""

from __future__ import annotations

import time

import torch

from swarm.client import SwarmClient
from swarm.client.routing import Link
from swarm.client.session import InferenceSession
from tests.launcher import LocalSwarm

PROMPT = "Write a short story about a robot who learns to paint."


def default_model_prompt(prompt: str = PROMPT):
    """(source, tokenizer, chat-templated prompt ids) of the default model, for the benchmarks that share a prompt."""
    from transformers import AutoTokenizer

    from swarm.model.source import DEFAULT_MODEL_ID, resolve_model

    source = resolve_model(DEFAULT_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return source, tokenizer, list(ids["input_ids"])


def _pick(logits: torch.Tensor, suppress: list[int]) -> int:
    logits = logits.float().clone()
    logits[..., suppress] = float("-inf")
    return int(logits.reshape(-1).argmax())


@torch.inference_mode()
def local_run(model, prompt_ids: list[int], new_tokens: int, suppress: list[int]) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    out = model(torch.tensor([prompt_ids]), use_cache=True)
    tokens = [_pick(out.logits[0, -1], suppress)]
    first = time.perf_counter()
    cache = out.cache
    for _ in range(new_tokens - 1):
        out = model(torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
        cache = out.cache
        tokens.append(_pick(out.logits[0, -1], suppress))
    end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first), tokens


async def swarm_run(client: SwarmClient, chain: list[Link], prompt_ids: list[int], new_tokens: int,
                    suppress: list[int]) -> tuple[float, float, list[int]]:
    start = time.perf_counter()
    session = await InferenceSession.open(client.p2p, chain, max_length=len(prompt_ids) + new_tokens)
    async with session:
        logits = await client.prefill(session, torch.tensor([prompt_ids]))
        tokens = [_pick(logits, suppress)]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = await client.decode(session, torch.tensor([tokens[-1]]))
            tokens.append(_pick(logits, suppress))
        end = time.perf_counter()
    return first - start, (new_tokens - 1) / (end - first), tokens


def start_peers(swarm: LocalSwarm, model: str, layouts: dict[str, list[str]], *extra: str) -> dict[str, dict[str, str]]:
    """Start every peer of every layout at once; layout name → blocks → peer id."""
    procs = {(name, blocks): swarm.start_peer(model, blocks, *extra, wait=False)
             for name, spans in layouts.items() for blocks in spans}
    ids: dict[str, dict[str, str]] = {name: {} for name in layouts}
    for (name, blocks), proc in procs.items():
        ids[name][blocks] = LocalSwarm.peer_id(proc)
    swarm.procs_by_layout = procs
    return ids


async def chain_of(client: SwarmClient, peers: dict[str, str]) -> list[Link]:
    """The chain through exactly these peers (blocks → peer id), in block order."""
    spans = {s.peer_id: s for s in await client.spans()}
    chain = []
    for blocks, peer_id in sorted(peers.items(), key=lambda item: int(item[0].split(":")[0])):
        start, end = (int(x) for x in blocks.split(":"))
        chain.append(Link(spans[peer_id], start, end))
    return chain
