"""The parts of a model a client runs itself: input embeddings, final norm and LM head (tied or not)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.model.anatomy import find_anatomy, load_config, load_parts, skeleton
from swarm.model.source import ModelSource
from swarm.model.weights import Checkpoint


class LocalHead(nn.Module):
    def __init__(self, config: PretrainedConfig, embeddings: nn.Module, norm: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.config = config
        self.embeddings, self.norm, self.lm_head = embeddings, norm, lm_head
        self.num_blocks: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = lm_head.weight.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [B, T] → hidden [B, T, H], the input of block 0."""
        return self.embeddings(input_ids)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, H], the output of the last block → float32 logits [B, T, V]."""
        return self.lm_head(self.norm(hidden.to(self.dtype))).float()


def load_head(source: ModelSource, dtype: torch.dtype = torch.float32) -> LocalHead:
    config = load_config(source.path)
    model = skeleton(config, dtype)
    anatomy = find_anatomy(model, config)
    parts = [anatomy.embeddings, anatomy.final_norm, anatomy.lm_head]
    embeddings, norm, lm_head = load_parts(Checkpoint(source.path), model, anatomy, parts, dtype)
    return LocalHead(config, embeddings, norm, lm_head)
