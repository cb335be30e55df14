"""A contiguous span of decoder blocks and the KV cache of one session over it.

`load_span(source, start, end)` builds blocks `[start, end)` with transformers' own layer classes and loads only their
tensors. `BlockSpan.forward(hidden, cache, position)` runs them the way the model's own forward would: rotary
position embeddings from the model's rotary module, a causal mask aligned with what the cache already holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import inspect
import logging

import torch
from torch import nn
from transformers import PretrainedConfig

from swarm.model import lean as lean_decode
from swarm.model import segments
from swarm.model.anatomy import (
    UnsupportedModelError,
    checkpoint_for,
    find_anatomy,
    is_encoder,
    load_config,
    load_parts,
    skeleton,
)
from swarm.model.precision import Precision
from swarm.model.source import ModelSource
from swarm_kernels import attention, packed
from swarm_kernels.quant import QuantLinear, int8_activation_bytes, prepare_int8_activations, quantize_linears

logger = logging.getLogger(__name__)


class SpanKVCache:
    """Keys and values of one session for every block of a span, grown in chunks as the session grows.

    Implements the one method transformers' attention layers call on a cache: `update(k, v, layer_idx)`, which
    appends the new keys/values of that layer and returns everything the layer may attend to. Buffers are shaped
    from the first update (`[batch, kv_heads, capacity, head_dim]`), so no per-family head geometry is needed here.
    With `dtype` (torch.float16 on a CPU span: the peer's --kv-dtype), they hold the states rounded to it: half the
    memory, and half what a decode step reads (swarm_kernels/cpu_attention.c reads and writes them as they are);
    `update` gives the layers what they hold in the states' dtype.
    """

    GROW = 128  # tokens added per reallocation: bounds copies to O(length / GROW)

    @classmethod
    def reserved_tokens(cls, end: int, max_length: int) -> int:
        """The KV tokens per row a peer reserves for a session holding `end` tokens: whole growth chunks, at most its
        max_length (swarm.server.backend; the simulator's peers hold the same, benchmarks/sim)."""
        return min(max_length, -(-max(1, end) // cls.GROW) * cls.GROW)

    def __init__(self, num_layers: int, max_length: int, dtype: torch.dtype | None = None):
        self.num_layers = num_layers
        self.max_length = max_length
        self.dtype = dtype  # of the buffers (None: the states')
        self.length = 0  # tokens committed for every layer
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        # per layer, what the native decode attention reads of its buffers, recorded when they are allocated
        # (swarm_kernels.attention.DecodeRows.check_caches): None where they are not what it reads
        self.native: list[tuple[int, ...] | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [B, kv_heads, new, D]
        end = self.length + key_states.shape[-2]
        keys, values = self.reserve(key_states, value_states, layer_idx, end)
        keys[:, :, self.length : end] = key_states
        values[:, :, self.length : end] = value_states
        if keys.dtype != key_states.dtype:  # 16-bit buffers: what they hold, in the layers' dtype
            return keys[:, :, :end].to(key_states.dtype), values[:, :, :end].to(value_states.dtype)
        return keys[:, :, :end], values[:, :, :end]

    def reserve(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
                end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers ([B, kv_heads, capacity, D], shaped like these states), grown to hold at
        least `end` tokens; the first `length` kept."""
        if end > self.max_length:
            raise ValueError(f"session would grow to {end} tokens, past its max_length {self.max_length}")
        keys, values = self._keys[layer_idx], self._values[layer_idx]
        if keys is None or values is None or keys.shape[-2] < end:
            capacity = min(self.max_length, max(end, (keys.shape[-2] if keys is not None else 0) + self.GROW))
            keys, values = self._grow(keys, key_states, capacity), self._grow(values, value_states, capacity)
            self._keys[layer_idx], self._values[layer_idx] = keys, values
            self.native[layer_idx] = attention.native_record(keys, values)
        return keys, values

    def _grow(self, old: torch.Tensor | None, like: torch.Tensor, capacity: int) -> torch.Tensor:
        shape = (*like.shape[:-2], capacity, like.shape[-1])
        buffer = torch.empty(shape, dtype=self.dtype or like.dtype, device=like.device)
        if old is not None:
            buffer[:, :, : self.length] = old[:, :, : self.length]
        return buffer

    def copy_prefix(self, source: SpanKVCache, tokens: int) -> bool:
        """Start this (empty) cache as a copy of `source`'s first `tokens` tokens, every layer it holds (a forked
        session: swarm.protocol); False, copying nothing, if source holds fewer or this cache is not empty."""
        if self.length or not 1 <= tokens <= min(source.length, self.max_length) \
                or source.num_layers != self.num_layers:
            return False
        for i, (keys, values) in enumerate(zip(source._keys, source._values, strict=True)):
            if keys is not None and values is not None:
                # whole growth chunks, as a session's own steps grow it (what the peer's KV budget reserves)
                mine_k, mine_v = self.reserve(keys, values, i, self.reserved_tokens(tokens, self.max_length))
                mine_k[:, :, :tokens] = keys[:, :, :tokens]
                mine_v[:, :, :tokens] = values[:, :, :tokens]
        self.length = tokens
        return True

    def commit(self, new_tokens: int) -> None:
        """Called once every layer has seen the step's new tokens."""
        self.length += new_tokens

    def rewind(self, position: int) -> None:
        """Forget tokens from `position` on (the next step overwrites them)."""
        if not 0 <= position <= self.length:
            raise ValueError(f"cannot rewind a cache of {self.length} tokens to {position}")
        self.length = position

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._keys + self._values if t is not None)


class _PaddedBatchCache:
    """The cache a batched decode step hands the layers: rows are sessions with caches of their own."""

    def __init__(self, caches: list[SpanKVCache]):
        self.caches = caches

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        return segments.pad_rows([cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx)
                                  for i, cache in enumerate(self.caches)])


class BlockSpan(nn.Module):
    """Blocks `[start, end)` of a model, runnable on hidden states with a per-session SpanKVCache.

    What differs between families is read from the layers and the config rather than written per family: the keyword
    a layer takes its cache by and any other argument it requires (Falcon's `alibi`, passed as None when it uses
    rotary positions), a rotary module that computes per layer type (Gemma 3), sliding-window layers
    (`config.layer_types`, or every layer when a config has `sliding_window` and no layer types, as Mistral), and
    eager attention (no SDPA in the family: then every multi-token step gets an explicit mask).
    """

    def __init__(self, blocks: list[nn.Module], rotary: nn.Module | None, start: int, end: int, hidden_size: int,
                 precision: Precision | None = None, config: PretrainedConfig | None = None,
                 explicit_masks: bool = False, encoder: bool = False):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.rotary = rotary
        self.start, self.end = start, end
        self.hidden_size = hidden_size
        self.precision = precision or Precision("cpu", torch.float32, "none")
        self.explicit_masks = explicit_masks
        self.encoder = encoder  # bidirectional blocks over a whole input, no KV cache (embedding models)
        self.kv_dtype: torch.dtype | None = None  # of the sessions' caches (None: the activations'; set_kv_dtype)
        for i, block in enumerate(self.blocks):  # index the session cache by position within the span
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    setattr(module, "layer_idx", i)  # noqa: B010 - an attribute of some modules, unknown to nn.Module
        self.cache_keyword = cache_keyword(self.blocks[0]) if blocks and not encoder else "cache"
        self._accepts = [_accepted_arguments(block) for block in self.blocks]
        layer_types = list(getattr(config, "layer_types", None) or [])
        window = getattr(config, "sliding_window", None) if config is not None else None
        self.layer_types = [layer_types[start + i] if layer_types else None for i in range(len(self.blocks))]
        self.windows = [window if window and (t == "sliding_attention" or (t is None and not layer_types)) else None
                        for t in self.layer_types]
        self._rotary_per_type = rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters
        # steps of several sessions in one sequence (forward_mixed): every family whose attention the config names
        self.mixes = not encoder and bool(blocks) and segments.supported(blocks)
        if self.mixes:
            segments.enable(blocks)
        # float32 on the CPU: a batch's decode rows may attend in one native call (swarm_kernels.attention)
        self._native_rows = self.mixes and self.precision.device == "cpu" and self.precision.dtype == torch.float32
        # the lean path of decode rounds and chunks (swarm.model.lean): True until prepare_lean decides, then it or None
        self._lean: lean_decode.LeanDecode | bool | None = self._native_rows

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def device(self) -> torch.device:
        return torch.device(self.precision.device)

    def kernels(self) -> set[str]:
        """The kernels this span's linear layers run other than torch's nn.Linear: quantized ones, or "onednn"
        (prepacked float32 weights); empty when none."""
        return {m.kernel for m in self.modules() if isinstance(m, QuantLinear | packed.PackedLinear)}

    def weight_bytes(self) -> int:
        return (sum(t.nbytes for t in self.parameters()) + sum(t.nbytes for t in self.buffers())
                + packed.packed_bytes(self) + int8_activation_bytes(self))

    def set_kv_dtype(self, name: str) -> None:
        """The sessions' caches in "float32" (the activations' dtype) or "float16" (a float32 CPU span only: half the
        KV memory, and about 0.7x the time of a 64-row step's attention; the values rounded to halves, so outputs
        differ slightly from a float32 cache's)."""
        if name not in ("float32", "float16"):
            raise ValueError(f"--kv-dtype {name!r}: expected float32 or float16")
        if name == "float16" and not (self.precision.device == "cpu" and self.precision.dtype == torch.float32):
            raise ValueError("--kv-dtype float16 is for float32 spans on the CPU")
        self.kv_dtype = torch.float16 if name == "float16" else None

    def new_cache(self, max_length: int) -> SpanKVCache:
        return SpanKVCache(len(self.blocks), max_length, self.kv_dtype)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, cache: SpanKVCache, position: int, blocks: slice | None = None):
        """hidden: [B, T, H] for tokens at positions position..position+T-1 → [B, T, H] after the blocks."""
        if self.encoder:
            return self._encode(hidden, position, blocks)
        batch, new, _ = hidden.shape
        if self.mixes and batch == new == 1 and self._native_rows:
            # a decode row: the same native attention as batched with others (swarm_kernels.attention), the same bits
            # (the native int8/int4 linears on a CPU with AMX: within float32 rounding, swarm_kernels/cpu_amx.h)
            return self.forward_mixed(hidden, [segments.Segment(cache, position, 1)], blocks)
        if self.mixes and batch == 1 and hidden.dtype == torch.float32:
            step = segments.Segment(cache, position, new)
            if (plan := self._lean_path()) is not None and plan.takes([step]):
                # a prefill chunk as rows of the lean path: the computation it gets in a round with others
                return self.forward_mixed(hidden, [step], blocks)
        cache.rewind(position)
        position_ids = torch.arange(position, position + new, device=hidden.device).expand(batch, -1)

        def mask(window: int | None) -> torch.Tensor | None:
            return causal_mask(new, position, hidden.dtype, hidden.device, window, self.explicit_masks)

        hidden = self._run(hidden, position_ids, cache, mask, blocks)
        cache.commit(new)
        return hidden

    @torch.inference_mode()
    def forward_batch(self, hidden: torch.Tensor, caches: list[SpanKVCache], positions: list[int],
                      blocks: slice | None = None, lean: bool = True) -> torch.Tensor:
        """One decode step of several sessions at once: hidden [N, 1, H], row i the next token of the session whose
        cache is caches[i], at positions[i] → [N, 1, H].

        The layers see one batch (the weights are read once for all rows: on a memory-bound CPU or GPU this is what
        makes N sessions cost about one). Where the family mixes sessions in one sequence (`mixes`: all but
        Falcon) the rows are one-token segments of forward_mixed (for plain-SDPA families each row's attention runs
        over its own cached keys, as alone: a Llama-family row gives the same bits batched or alone, except on the
        tile unit of a CPU with AMX, within float32 rounding (swarm_kernels/cpu_amx.h); see
        swarm.model.segments; `lean`: through swarm.model.lean where the span has it, the same bits). Otherwise each
        layer's keys/values are appended to every row's own cache and handed to attention as one right-padded batch,
        with an additive mask hiding each row's padding (and, for a sliding layer, what falls out of that row's
        window)."""
        if hidden.shape[1] != 1 or len(caches) != hidden.shape[0] or len(positions) != len(caches):
            raise ValueError("forward_batch takes one new token per session")
        if self.mixes:  # one sequence of one-token segments: each row's attention over its own keys, no padding
            steps = [segments.Segment(cache, position, 1) for cache, position in zip(caches, positions, strict=True)]
            return self.forward_mixed(hidden.reshape(1, *hidden.shape[::2]), steps, blocks,
                                      lean).reshape(hidden.shape)
        for cache, position in zip(caches, positions, strict=True):
            cache.rewind(position)
        position_ids = torch.tensor(positions, device=hidden.device)[:, None]
        lengths = torch.tensor(positions, device=hidden.device) + 1  # keys each row attends to, its new token included

        def mask(window: int | None) -> torch.Tensor:
            return segments.padded_decode_mask(lengths, window, hidden.dtype)

        hidden = self._run(hidden, position_ids, _PaddedBatchCache(caches), mask, blocks)
        for cache in caches:
            cache.commit(1)
        return hidden

    @torch.inference_mode()
    def forward_mixed(self, hidden: torch.Tensor, steps: list[segments.Segment],
                      blocks: slice | None = None, lean: bool = True) -> torch.Tensor:
        """Steps of several sessions in one forward: hidden [1, ΣT, H] holds each step's T tokens after the previous
        step's (decode rows, prefill chunks, in any mix), step i at steps[i].position of steps[i].cache → [1, ΣT, H].
        Only for spans with `mixes` (swarm.model.segments). The round takes the lean path where the span has one
        (swarm.model.lean: decode rows the same bits, chunks within float32 rounding); `lean=False` never."""
        if not self.mixes:
            raise ValueError("this span's family cannot run steps of different sessions in one sequence")
        if hidden.shape[0] != 1 or hidden.shape[1] != sum(step.tokens for step in steps):
            raise ValueError("forward_mixed takes [1, sum of the steps' tokens, H]")
        for step in steps:
            step.cache.rewind(step.position)
        if lean and hidden.dtype == torch.float32 and (plan := self._lean_path()) is not None and plan.takes(steps):
            try:
                hidden = plan.forward(hidden, steps, blocks)
            except lean_decode.Unavailable as e:  # nothing committed: the generic path redoes the round
                logger.debug("lean decode unavailable: %s", e)
            else:
                for step in steps:
                    step.cache.commit(step.tokens)
                return hidden
        position_ids = torch.cat([torch.arange(s.position, s.position + s.tokens, device=hidden.device)
                                  for s in steps])[None]
        with segments.mixed(steps, self.windows, self.explicit_masks) as cache:
            hidden = self._run(hidden, position_ids, cache, lambda window: None, blocks)
        for step in steps:
            step.cache.commit(step.tokens)
        return hidden

    @property
    def runs_lean(self) -> bool:
        """Whether decode rounds take the lean path (swarm.model.lean)."""
        return self._lean_path() is not None

    def _lean_path(self) -> lean_decode.LeanDecode | None:
        """The span's lean path (decided at its first use where prepare_lean has not run), or None."""
        if self._lean is True:
            self.prepare_lean()
        return self._lean if isinstance(self._lean, lean_decode.LeanDecode) else None

    def prepare_lean(self) -> bool:
        """Decide (once) whether decode rounds take the lean path (swarm.model.lean: it checks it gives the same bits
        as the layers' own); done at the first decode round otherwise. The blocks' modules are not to be replaced
        after this (a quantization then would go unseen by the lean path). Returns whether it is taken."""
        if self._lean is True:
            self._lean = False  # while its check runs (its generic rounds come back through forward_mixed)
            self._lean = lean_decode.prepare(self)
        return bool(self._lean)

    def _run(self, hidden: torch.Tensor, position_ids: torch.Tensor, cache, mask, blocks: slice | None):
        selected = range(len(self.blocks))[blocks or slice(None)]
        embeddings: dict[str | None, object] = {}
        if self.rotary is not None:
            for t in {self.layer_types[i] for i in selected}:
                embeddings[t] = (self.rotary(hidden, position_ids, t) if self._rotary_per_type
                                 else self.rotary(hidden, position_ids))
        masks: dict[int | None, torch.Tensor | None] = {}
        for i in selected:
            window = self.windows[i]
            if window not in masks:
                masks[window] = mask(window)
            arguments = {"attention_mask": masks[window], "position_ids": position_ids, "use_cache": True,
                         "position_embeddings": embeddings.get(self.layer_types[i]), self.cache_keyword: cache}
            accepts, required = self._accepts[i]
            if accepts is not None:
                arguments = {k: v for k, v in arguments.items() if k in accepts}
            out = self.blocks[i](hidden, **arguments, **dict.fromkeys(required))
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _encode(self, hidden: torch.Tensor, position: int, blocks: slice | None) -> torch.Tensor:
        """An encoder's blocks over one whole, unpadded input: every token sees every other, nothing is cached."""
        if position != 0:
            raise ValueError("an encoder span keeps no cache: send the whole input at position 0")
        for block in self.blocks[blocks or slice(None)]:
            out = block(hidden)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def _accepted_arguments(block: nn.Module) -> tuple[set[str] | None, list[str]]:
    """(keyword arguments the layer accepts, None for any; required arguments we do not supply, passed as None)."""
    parameters = list(inspect.signature(block.forward).parameters.values())[1:]  # after hidden_states
    ours = {"attention_mask", "position_ids", "use_cache", "position_embeddings", "cache", "past_key_values",
            "past_key_value", "layer_past"}
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name not in ours
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return (None if any_keyword else {p.name for p in parameters}), required


def cache_keyword(block: nn.Module) -> str:
    """The keyword a decoder layer takes its KV cache by: `cache` in transformers >= 5.2x, `past_key_values` before.
    A wrong keyword is swallowed by the layer's **kwargs and the layer silently runs without a cache (every decode
    step then attends to itself alone): so look it up instead of assuming it."""
    parameters = inspect.signature(block.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if name in parameters:
            return name
    raise UnsupportedModelError(f"{type(block).__name__}.forward takes no KV cache argument: {list(parameters)}")


def causal_mask(new: int, past: int, dtype: torch.dtype, device: torch.device, window: int | None = None,
                explicit: bool = False) -> torch.Tensor | None:
    """Additive mask [1, 1, new, past + new] letting token i see positions <= past + i (and, with a sliding window,
    > past + i - window); None where SDPA's own `is_causal` (a prefill from 0) or no mask (one new token) is exact,
    matching transformers' own choice. `explicit`: always a mask for several tokens (eager attention has no
    is_causal)."""
    total = past + new
    if (window is None or total <= window) and (new == 1 or (past == 0 and not explicit)):
        return None
    query = torch.arange(past, total, device=device)[:, None]
    key = torch.arange(total, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    mask = torch.zeros(new, total, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def release_freed_memory() -> None:
    """glibc keeps freed heap memory mapped (freed blocks of a dynamically raised mmap threshold land on the heap);
    malloc_trim returns it. Without it a quantized span's process keeps the RSS of its unquantized weights. What
    swarm.heap froze is unfrozen for the collection (cycles of what was dropped since are freed) and frozen again."""
    frozen = gc.get_freeze_count()
    gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def load_span(source: ModelSource, start: int, end: int, dtype: torch.dtype = torch.float32,
              precision: Precision | None = None, pack: bool = True) -> BlockSpan:
    """Build blocks [start, end) of `source` and load only their tensors, then place and quantize them as `precision`
    says (default: unquantized on the CPU in `dtype`). Quantization happens block by block on the target device,
    so the unquantized weights of at most one block exist there at a time. Unquantized float32 linears on the CPU
    run oneDNN's prepacked weights (packed); `pack=False` keeps them nn.Linear (to quantize them later)."""
    precision = precision or Precision("cpu", dtype, "none")
    config = load_config(source.path)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"blocks {start}:{end} are outside 0:{config.num_hidden_layers} of {source.model_id}")
    model = skeleton(config, precision.dtype)
    anatomy = find_anatomy(model, config)
    checkpoint = checkpoint_for(source.path, model, anatomy, [f"{anatomy.blocks}.{start}"])
    device = torch.device(precision.device)
    blocks, repacked = [], 0
    for i in range(start, end):  # one block at a time: a quantized span never holds all its unquantized weights
        (block,) = load_parts(checkpoint, model, anatomy, [f"{anatomy.blocks}.{i}"], precision.dtype)
        block.to(device)
        if precision.quant != "none":
            quantize_linears(block, precision.quant)
        elif pack and packed.available():
            repacked += packed.pack_linears(block)  # float32 on the CPU: oneDNN's prepacked weights (packed)
        blocks.append(block)
    if precision.quant != "none" or repacked:
        release_freed_memory()  # the unquantized (unpacked) weights are garbage now; hand their pages back to the OS
    rotary = model.get_submodule(anatomy.rotary).to(device) if anatomy.rotary else None
    span = BlockSpan(blocks, rotary, start, end, config.hidden_size, precision, config,
                     explicit_masks=anatomy.attn_implementation != "sdpa", encoder=is_encoder(config))
    if pack and span.prepare_lean():  # its final modules: decide the decode rounds' path now, not in the first round
        release_freed_memory()  # the projections' buffers before they were joined
    prepare_int8_activations(span)  # --activations int8: every repacked weight now, counted in weight_bytes
    logger.info("loaded blocks %d:%d of %s: %s, %.1f MiB of weights", start, end, source.model_id,
                precision.describe(), span.weight_bytes() / 2**20)
    return span
