"""Sentence embeddings through the swarm: tokenizer and pooling here, the encoder's blocks on peers.

Pooling follows the model's sentence-transformers files when present (`1_Pooling/config.json`: mean of the token
states by default, or the CLS token; `modules.json` listing a Normalize module: unit length), else mean + normalize.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoTokenizer

from swarm.client.client import SwarmClient

logger = logging.getLogger(__name__)


class SwarmEmbeddingService:
    def __init__(self, client: SwarmClient, tokenizer: Any):
        self.client, self.tokenizer, self.model_id = client, tokenizer, client.model_id
        self.context_length: int = getattr(client.head.config, "max_position_embeddings", 512)
        self.dimensions: int = client.head.config.hidden_size
        self.pooling, self.normalize = _pooling(client.source.path)

    @classmethod
    async def connect(cls, initial_peers: Sequence[str], model: str, **client_options) -> SwarmEmbeddingService:
        client = await SwarmClient.connect(initial_peers, model, **client_options)
        if not getattr(client.head, "is_encoder", False):
            await client.close()
            raise ValueError(f"{model} is not an encoder-only model; embeddings need one (e.g. all-minilm-l6-v2)")
        return cls(client, AutoTokenizer.from_pretrained(client.source.path))

    async def close(self) -> None:
        await self.client.close()

    async def missing_blocks(self) -> list[tuple[int, int]]:
        """Blocks no live peer serves now ([] when a complete chain exists)."""
        return await self.client.missing_blocks()

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    async def embed(self, inputs: Sequence[str] | Sequence[Sequence[int]]) -> tuple[torch.Tensor, int]:
        """Embeddings [N, H] (float32) of texts or token-id lists, and how many tokens they took."""
        token_ids = [self.tokenize(item) if isinstance(item, str) else list(item) for item in inputs]
        for i, ids in enumerate(token_ids):
            if not ids:
                raise ValueError(f"input {i} is empty")
            if len(ids) > self.context_length:
                raise ValueError(f"input {i} has {len(ids)} tokens; {self.model_id} takes at most "
                                 f"{self.context_length}")
            if min(ids) < 0 or max(ids) >= self.tokenizer.vocab_size:
                raise ValueError(f"input {i} has token ids outside 0..{self.tokenizer.vocab_size - 1}")
        states = await self.client.encode(token_ids)
        vectors = torch.stack([s[0] if self.pooling == "cls" else s.mean(dim=0) for s in states]).float()
        if self.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return vectors, sum(len(ids) for ids in token_ids)


def _pooling(path) -> tuple[str, bool]:
    pooling, normalize = "mean", True
    pooling_file = path / "1_Pooling" / "config.json"
    if pooling_file.is_file():
        config = json.loads(pooling_file.read_text())
        pooling = "cls" if config.get("pooling_mode_cls_token") else "mean"
    modules_file = path / "modules.json"
    if modules_file.is_file():
        normalize = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules_file.read_text()))
    return pooling, normalize
