"""Tiny random-weight models of several families, saved as HF directories, for fast exact-comparison tests."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as T
from transformers import AutoModel, AutoModelForCausalLM

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
# Families whose configs do not take the Llama-style names above.
OWN = dict(vocab_size=512, eos_token_id=1, bos_token_id=0, pad_token_id=1)
MOE = dict(moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2)

# One tiny config per supported family, with the family's own twists switched on where a default would hide them:
# sliding windows shorter than the test sequences (Gemma 2 / 3), logit soft-capping and scales, embedding multipliers.
CONFIGS = {
    "llama": lambda: T.LlamaConfig(**COMMON, rope_theta=10000.0, tie_word_embeddings=False),
    "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: T.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=16),
    "gemma": lambda: T.GemmaConfig(**COMMON, head_dim=16),
    "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16, sliding_window=4, final_logit_softcapping=5.0),
    "gemma3_text": lambda: T.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=4),
    "phi": lambda: T.PhiConfig(**COMMON),
    "phi3": lambda: T.Phi3Config(**COMMON),
    "gpt2": lambda: T.GPT2Config(**OWN, n_embd=64, n_layer=6, n_head=4, n_positions=512),
    "gptj": lambda: T.GPTJConfig(**OWN, n_embd=64, n_layer=6, n_head=4, n_positions=512, rotary_dim=8),
    "gpt_neox": lambda: T.GPTNeoXConfig(**COMMON),
    "falcon": lambda: T.FalconConfig(**OWN, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                     new_decoder_architecture=True, num_kv_heads=2),
    "opt": lambda: T.OPTConfig(**OWN, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, ffn_dim=128,
                               max_position_embeddings=512, word_embed_proj_dim=64),
    "mixtral": lambda: T.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, **MOE, shared_expert_intermediate_size=64),
    "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, **MOE, head_dim=16),
    "stablelm": lambda: T.StableLmConfig(**COMMON),
    "starcoder2": lambda: T.Starcoder2Config(**COMMON),
    "olmo": lambda: T.OlmoConfig(**COMMON),
    "olmo2": lambda: T.Olmo2Config(**COMMON),
    "granite": lambda: T.GraniteConfig(**COMMON, embedding_multiplier=3.0, logits_scaling=4.0,
                                       residual_multiplier=0.5, attention_multiplier=0.2),
    "cohere": lambda: T.CohereConfig(**COMMON, logit_scale=0.5),
    "smollm3": lambda: T.SmolLM3Config(**COMMON),
    "glm": lambda: T.GlmConfig(**COMMON, head_dim=16),
    # encoder-only (embeddings): saved as base models, as sentence-transformers checkpoints are
    "bert": lambda: T.BertConfig(**OWN, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=512),
    "roberta": lambda: T.RobertaConfig(**OWN, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                                       intermediate_size=128, max_position_embeddings=520),
}
ENCODERS = ("bert", "roberta")


def make_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """Save a random-weight model of `family` under `path` and return the directory."""
    torch.manual_seed(seed)
    auto = AutoModel if family in ENCODERS else AutoModelForCausalLM
    model = auto.from_config(CONFIGS[family](), dtype=torch.float32)
    # Random init has tiny weights: scale them up so that logits are far from uniform and greedy is decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    return path
