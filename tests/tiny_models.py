"""Tiny random-weight models of several families, saved as HF directories, for fast exact-comparison tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

COMMON = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    eos_token_id=1,
    bos_token_id=0,
    pad_token_id=1,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": lambda: MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: Qwen3Config(**COMMON, head_dim=16),
}


def make_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """Save a random-weight model of `family` under `path` and return the directory."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=torch.float32)
    # Random init has tiny weights: scale them up so that logits are far from uniform and greedy is decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return path
