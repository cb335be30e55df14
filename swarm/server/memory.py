"""The peer's KV-cache budget, in tokens of its span, and the reservations sessions hold against it."""

from __future__ import annotations

import psutil
import torch
from transformers import PretrainedConfig


def kv_bytes_per_token(config: PretrainedConfig, num_blocks: int, dtype: torch.dtype) -> int:
    """Bytes one token of one sequence occupies in the KV cache of `num_blocks` blocks."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * num_blocks * kv_heads * head_dim(config) * torch.finfo(dtype).bits // 8


def head_dim(config: PretrainedConfig) -> int:
    """The size of one attention head's keys and values."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def default_budget_tokens(bytes_per_token: int, fraction: float = 0.25, cap_bytes: int = 8 << 30) -> int:
    """A quarter of the memory available now (at most 8 GiB), in tokens."""
    return int(min(psutil.virtual_memory().available * fraction, cap_bytes) // bytes_per_token)


class KVBudget:
    """Admission control in tokens of the span's KV cache. A session reserves what its cache holds, in the chunks the
    cache grows by (SpanKVCache.GROW), as it grows (`try_grow`), and returns everything on close."""

    def __init__(self, total_tokens: int):
        if total_tokens <= 0:
            raise ValueError("the KV budget must be positive")
        self.total = total_tokens
        self.reserved: dict[str, int] = {}

    @property
    def free(self) -> int:
        return self.total - sum(self.reserved.values())

    def try_reserve(self, owner: str, tokens: int) -> bool:
        if owner in self.reserved or tokens > self.free:
            return False
        self.reserved[owner] = tokens
        return True

    def try_grow(self, owner: str, tokens: int) -> bool:
        """Raise `owner`'s reservation to `tokens` (never lowers it); False when the budget cannot."""
        held = self.reserved.get(owner, 0)
        if tokens <= held:
            return True
        if tokens - held > self.free:
            return False
        self.reserved[owner] = tokens
        return True

    def release(self, owner: str) -> None:
        self.reserved.pop(owner, None)
