"""One forward over steps of several sessions of different lengths: decode rows and prefill chunks together.

The linear layers, norms and rotary embeddings of a decoder block work token by token, so the steps of many
sessions can run through them as one sequence [1, ΣT, H] (a session's T tokens after another's): the weights are
read once for all of them, and a prefill chunk's matrix product carries the decode rows almost for free. Only
attention must see each session's own keys. So while a mixed forward runs (`mixed(...)`):
- the layers' cache is `SegmentsCache`: it splits each layer's new keys/values by session, appends them to every
  session's own SpanKVCache and keeps what each session may attend to;
- the layers' attention implementation is `segments_attention` (registered with transformers as "swarm_segments"
  and set on the span's config by `enable`): it runs the family's own attention (SDPA or its eager function, with
  its scaling, GQA, soft-capping) for the decode rows and once per prefill chunk (its causal mask, as if alone),
  and puts the outputs back in sequence order. Decode rows: where the family's attention is transformers' plain
  SDPA, each row over its own keys (no copy, no mask; a sliding layer's row takes its window's keys): in float32 on
  the CPU every row of a layer in one native call (swarm_kernels.attention; the rows' new keys and values are appended
  to their caches in one call each too), otherwise torch's SDPA per row (transformers' wrapper skipped, it costs
  as much as a short row's attention); for other families the family's function once for all of them,
  right-padded under a mask. A batch of decode rows (BlockSpan.forward_batch), and a lone session's decode step
  (BlockSpan.forward), run the same way.
Outside a mixed forward `segments_attention` is the family's own attention, unchanged.

A session's result is its step run alone: its tokens meet the same weights (a row's output of the linears does not
depend on the other rows) and attention sees exactly its own keys: the same bits for a decode row of a plain-SDPA family
like Llama (tests/unit/test_span.py), within rounding where a padded batch, a sliding window or routed experts reorder
the sums, or where the native int8/int4 kernel takes a CPU's tile unit for calls of five rows or more
(swarm_kernels/cpu_amx.h: float32-accurate, other bits than fewer rows'). In a 16-row decode of SmolLM2's 30 int4 blocks
on a 2-core EPYC, the native rows' attention and appends took the forward from 38.4 to 28.5 ms (32 rows: 74.6 to 51.3
ms; 4 rows: 15.3 to 13.6 ms); sharing each call's rows among the peer's kernel threads and laying the rows out once per
forward (`attention.DecodeRows`, kept in the plan), 29.7 to 23.1 ms (64 rows: 106 to 89 ms). """

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from swarm_kernels import attention

NAME = "swarm_segments"


@dataclass
class Segment:
    """One session's step in a mixed forward: `tokens` new tokens at `position` of the session's `cache`."""

    cache: Any  # swarm.model.span.SpanKVCache
    position: int
    tokens: int


@dataclass
class _Plan:
    segments: list[Segment]
    windows: list[int | None]  # per layer of the span
    explicit_masks: bool  # eager attention: every multi-token step gets a mask
    layer: int = 0  # the layer whose keys were appended last
    native: attention.DecodeRows | None = None  # the decode rows' native calls (float32 CPU), once the first layer ran
    native_layer: int | None = None  # the layer whose rows `native` checked and appended
    # per segment, for `layer`: its cache's keys and values (buffers that may hold more) and how many it attends to
    keys: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    dtype: torch.dtype = torch.float32  # the layer's states' (16-bit cache buffers are read back in it)
    starts: list[int] = field(init=False)  # where each segment's tokens begin in the sequence
    rows: list[int] = field(init=False)  # the segments of one token (decode rows)

    def __post_init__(self) -> None:
        self.starts, offset = [], 0
        for segment in self.segments:
            self.starts.append(offset)
            offset += segment.tokens
        self.rows = [i for i, s in enumerate(self.segments) if s.tokens == 1]

    def attended(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment i's keys and values [1, kv_heads, length, D] for `layer`, in the states' dtype (a decode row's
        buffers, appended natively, may hold float16: --kv-dtype)."""
        (keys, values), length = self.keys[i], self.lengths[i]
        if keys.shape[-2] != length:
            keys, values = keys[:, :, :length], values[:, :, :length]
        return (keys, values) if keys.dtype == self.dtype else (keys.to(self.dtype), values.to(self.dtype))


_ACTIVE: contextvars.ContextVar[_Plan | None] = contextvars.ContextVar("swarm_segments", default=None)
_ORIGINAL = "_swarm_original_attn"  # config attribute: the implementation segments_attention stands in for


class SegmentsCache:
    """The cache a mixed forward hands the layers (see the module's doc)."""

    def __init__(self, plan: _Plan):
        self.plan = plan

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [1, kv_heads, ΣT, D]
        plan = self.plan
        appended: dict[int, tuple[tuple[torch.Tensor, torch.Tensor], int]] = {}
        plan.native_layer = None
        if plan.rows and key_states.is_cpu and key_states.dtype == torch.float32 and attention.available():
            # decode rows: their new keys and values into their caches' buffers, one native call each
            if plan.native is None:
                plan.native = attention.DecodeRows([plan.starts[i] for i in plan.rows],
                                                   [plan.segments[i].cache.length + 1 for i in plan.rows])
            native = plan.native
            buffers = [plan.segments[i].cache.reserve(key_states, value_states, layer_idx, n)
                       for i, n in zip(plan.rows, native.lengths, strict=True)]
            if (native.check([k for k, _ in buffers], [v for _, v in buffers])
                    and native.append(key_states, value_states)):
                plan.native_layer = layer_idx
                appended = {i: (kv, n) for i, kv, n in zip(plan.rows, buffers, native.lengths, strict=True)}
        plan.layer, plan.keys, plan.lengths, plan.dtype = layer_idx, [], [], key_states.dtype
        for i, segment in enumerate(plan.segments):
            if i in appended:
                kv, length = appended[i]
            else:
                start, end = plan.starts[i], plan.starts[i] + segment.tokens
                kv = segment.cache.update(key_states[:, :, start:end], value_states[:, :, start:end], layer_idx)
                length = kv[0].shape[-2]
            plan.keys.append(kv)
            plan.lengths.append(length)
        return key_states, value_states  # not read: segments_attention takes each session's own keys


def pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys/values [1, kv_heads, K_i, D] of several sessions → one right-padded batch [N, kv_heads, max K_i, D]
    (just concatenated when every K_i is the same)."""
    if len(rows) == 1:
        return rows[0]
    total = max(k.shape[-2] for k, _ in rows)
    if all(k.shape[-2] == total for k, _ in rows):
        return torch.cat([k for k, _ in rows]), torch.cat([v for _, v in rows])
    first = rows[0][0]
    shape = (len(rows), first.shape[1], total, first.shape[-1])
    keys, values = first.new_zeros(shape), rows[0][1].new_zeros(shape)
    for i, (k, v) in enumerate(rows):
        keys[i, :, : k.shape[-2]] = k[0]
        values[i, :, : v.shape[-2]] = v[0]
    return keys, values


def padded_decode_mask(lengths: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [N, 1, 1, max length] for N one-token rows, row i attending to its first lengths[i] keys (and
    only the last `window` of them, for a sliding layer)."""
    keys = torch.arange(int(lengths.max()), device=lengths.device)[None, :]
    allowed = keys < lengths[:, None]
    if window is not None:
        allowed &= keys > (lengths[:, None] - 1) - window
    additive = torch.zeros(len(lengths), keys.shape[1], dtype=dtype, device=lengths.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None, None, :]


def _original(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The attention the family would run: SDPA, or its own eager function."""
    name = getattr(module.config, _ORIGINAL, "sdpa")
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def segments_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query [1, heads, ΣT, D] → [1, ΣT, heads, D], each session attending to its own keys (see the module's doc)."""
    from swarm.model.span import causal_mask  # span imports this module

    plan, original = _ACTIVE.get(), _original(module)
    if plan is None:
        return original(module, query, key, value, attention_mask, **kwargs)
    window, starts, rows = plan.windows[plan.layer], plan.starts, plan.rows
    out = query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
    direct = _direct_sdpa(original, query, kwargs) if rows else None
    scaling = kwargs.get("scaling")
    # plain SDPA, float32 on the CPU: every decode row against its own keys in one native call
    native = (direct is not None and plan.native is not None and plan.native_layer == plan.layer
              and plan.native.attend(query, out, query.shape[-1] ** -0.5 if scaling is None else scaling, window))
    if direct is not None and not native:  # plain SDPA: each decode row against its own keys, no mask or copy
        for i in rows:
            keys, values = plan.attended(i)
            if window is not None:  # a sliding layer: the last `window` keys, the new one included
                keys, values = keys[:, :, -window:], values[:, :, -window:]
            out[0, starts[i]] = direct(query[:, :, starts[i] : starts[i] + 1], keys, values)[0, :, 0]
    elif rows and direct is None:  # the family's own function, once for all decode rows: right-padded, masked
        keys, values = pad_rows([plan.attended(i) for i in rows])
        lengths = torch.tensor([plan.segments[i].position + 1 for i in rows], device=query.device)
        mask = padded_decode_mask(lengths, window, query.dtype)
        where = torch.tensor([starts[i] for i in rows], device=query.device)
        result, _ = original(module, query[0, :, where].transpose(0, 1)[:, :, None], keys, values, mask, **kwargs)
        out[0, where] = result[:, 0]
    for i, segment in enumerate(plan.segments):
        if segment.tokens == 1:
            continue
        start, end = starts[i], starts[i] + segment.tokens
        chunk_mask = causal_mask(segment.tokens, segment.position, query.dtype, query.device, window,
                                 plan.explicit_masks)
        keys, values = plan.attended(i)
        result, _ = original(module, query[:, :, start:end], keys, values, chunk_mask, **kwargs)
        out[:, start:end] = result
    return out, None


def _direct_sdpa(original: Callable[..., Any], query: torch.Tensor,
                 kwargs: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """torch's SDPA for one decode row ([1, heads, 1, D] against [1, kv_heads, K, D] → [1, heads, 1, D]) when the
    family's attention is transformers' plain SDPA (no soft-capping, sinks or dropout): what that function computes
    for one unmasked query, without its per-call wrapping, which costs as much as the attention of a short row.
    None otherwise (the family's own function is called per row)."""
    if original is not ALL_ATTENTION_FUNCTIONS.get("sdpa") or kwargs.get("dropout", 0.0):
        return None
    if set(kwargs) - {"dropout", "scaling", "sliding_window", "position_ids", "cache_position", "use_cache",
                      "is_causal"}:
        return None
    scaling = kwargs.get("scaling")

    def attend(row: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(row, keys, values, scale=scaling,
                                                                enable_gqa=row.shape[1] != keys.shape[1])

    return attend


ALL_ATTENTION_FUNCTIONS.register(NAME, segments_attention)


def supported(blocks: list[nn.Module]) -> bool:
    """Whether every attention module of these blocks picks its implementation from the config's name with a
    module-level eager function beside it (all supported families but Falcon)."""
    found = False
    for block in blocks:
        for module in block.modules():
            if isinstance(getattr(module, "config", None), PretrainedConfig) and hasattr(module, "layer_idx"):
                if not hasattr(sys.modules[type(module).__module__], "eager_attention_forward"):
                    return False
                if getattr(module.config, "reorder_and_upcast_attn", False):  # GPT-2's own eager path
                    return False
                found = True
    return found


def enable(blocks: list[nn.Module]) -> None:
    """Route the blocks' attention through segments_attention (the family's own attention outside mixed forwards)."""
    for block in blocks:
        for module in block.modules():
            config = getattr(module, "config", None)
            if isinstance(config, PretrainedConfig) and config._attn_implementation != NAME:
                setattr(config, _ORIGINAL, config._attn_implementation or "eager")
                config._attn_implementation = NAME


@contextlib.contextmanager
def mixed(segments: list[Segment], windows: list[int | None], explicit_masks: bool) -> Iterator[SegmentsCache]:
    """While active, layers given the yielded cache run the segments' attention separately."""
    plan = _Plan(segments, windows, explicit_masks)
    token = _ACTIVE.set(plan)
    try:
        yield SegmentsCache(plan)
    finally:
        _ACTIVE.reset(token)
