"""Text generation over the swarm for the gateway: tokenizer, chat template, n choices, penalties, logprobs.

Speaks plain Python types (lists of ints, strings, dataclasses) so that its caller needs neither torch nor
transformers. One request of n choices runs as one session of batch n.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

from kernels.sampling import LogitsAdjustments, SamplingParams, adjust_logits, sample, top_logprobs
from swarm.client.client import SwarmClient
from swarm.client.requests import GenerationRequest, TokenEvent

logger = logging.getLogger(__name__)


class SwarmTextService:
    """The swarm, seen as a text model: what the gateway's GenerationBackend needs."""

    def __init__(self, client: SwarmClient, tokenizer: Any):
        self.client = client
        self.tokenizer = tokenizer
        self.model_id = client.model_id
        config = client.head.config
        self.context_length: int = getattr(config, "max_position_embeddings", 2048)
        self.vocab_size: int = client.head.vocab_size
        eos = config.eos_token_id
        self.eos_token_ids: tuple[int, ...] = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], model: str | None = None,
                      **client_options: Any) -> SwarmTextService:
        client = await SwarmClient.connect(initial_peers, model, **client_options)
        loop = asyncio.get_running_loop()
        tokenizer = await loop.run_in_executor(None, AutoTokenizer.from_pretrained, client.source.path)
        return cls(client, tokenizer)

    async def missing_blocks(self) -> list[tuple[int, int]]:
        """Blocks no live peer serves now ([] when a complete chain exists)."""
        return await self.client.missing_blocks()

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    async def generate(self, request: GenerationRequest) -> AsyncIterator[list[TokenEvent]]:
        """Yield, per step, one event per unfinished choice; ends when every choice hit a stop token or the limit."""
        sampling = SamplingParams(temperature=request.temperature, top_p=request.top_p, seed=request.seed)
        adjust = LogitsAdjustments(request.presence_penalty, request.frequency_penalty,
                                   tuple(request.logit_bias.items()))
        stop_ids = set(request.stop_token_ids)
        n, client = request.n, self.client
        session = await client.inference_session(len(request.prompt_ids) + request.max_new_tokens, n)
        try:
            generator = sampling.generator()
            counts = torch.zeros(n, self.vocab_size)
            active = [True] * n
            tokens = torch.tensor([request.prompt_ids] * n)
            for _ in range(request.max_new_tokens):
                logits = (await client.forward(session, tokens))[:, -1]
                chosen, events = await client.run_in_worker(
                    self._choose, logits, counts, adjust, sampling, generator, request)
                step = []
                for i in range(n):
                    if active[i]:
                        event = events[i]
                        if event.token_id in stop_ids:
                            event = TokenEvent(i, event.token_id, event.logprob, event.top_logprobs, stop=True)
                            active[i] = False
                        step.append(event)
                yield step
                if not any(active):
                    return
                tokens = chosen[:, None]
        finally:
            await session.close()

    def _choose(self, logits, counts, adjust, sampling, generator, request) -> tuple[torch.Tensor, list[TokenEvent]]:
        if adjust.active:
            logits = adjust_logits(logits, counts, adjust)
        chosen = sample(logits, sampling, generator)
        counts[torch.arange(len(chosen)), chosen] += 1
        if request.logprobs is None:
            return chosen, [TokenEvent(i, int(t)) for i, t in enumerate(chosen)]
        chosen_lp, top_ids, top_lp = top_logprobs(logits, chosen, request.logprobs)
        return chosen, [
            TokenEvent(i, int(chosen[i]), float(chosen_lp[i]),
                       list(zip(top_ids[i].tolist(), top_lp[i].tolist(), strict=True)))
            for i in range(len(chosen))
        ]

    async def close(self) -> None:
        await self.client.close()
