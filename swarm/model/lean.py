"""Decode rows (and prefill chunks) through Llama-shaped blocks without transformers' per-layer Python: the same
operations, fewer calls.

A decode round through a span (`BlockSpan.forward_mixed` of one-token steps) spends as long outside the linear
kernels as in them on a small model: on a 2-core AVX2 EPYC, one row through SmolLM2's 30 int4 blocks took ~40 ms,
15 of them in the kernel; the rest is the layers' module calls, keyword plumbing, the attention interface and ~140
small torch calls per layer. `LeanDecode` runs the same computation for the blocks whose shape it knows — RMS norms
(Llama's weight * x or Gemma's x * (1 + weight), told apart by running the module), q/k/v/o projections with rotary
embeddings (q/k norms where the family has them), a gated MLP, two residual adds, and Gemma 3's norms after attention
and around the MLP (Llama, Mistral, Qwen2, Qwen3, SmolLM2, Gemma, Gemma 3) — as one loop per layer, with:
- the projections that read the same input in one kernel call: q|k|v and gate|up, where they run on the native
  kernel (quant.NativeLinear) with the same codes format; their buffers become views of the joined ones, so
  no weight is held twice, and each output row is computed as alone, so the bits are the same;
- the norm, activation and residual operations of transformers' code, in its order;
- the rotary embedding of the queries in one native call, of the keys in the call that appends them (and the values)
  to their caches (swarm_kernels.attention.rope: transformers' expression, each product and the sum rounded as
  torch rounds them), and the rows' attention in one more, as segments_attention does for the generic path.

Where a layer is plain Llama-shaped (no norm inside its attention or MLP half) with native-kernel projections (on
float32 activations, or int8 ones), all of it but the MLP's activation runs in two native calls
(swarm_kernels.fused: norm, attention, residual, norm and gate | up in one; down and residual in the other), the
same calls from C: one row through SmolLM2's 30 int4 blocks 11.9 → 8.8 ms, 16 rows 36.2 → 31.7 ms on a 2-core Zen 4
(int8 activations: 9.0 → 5.8 ms, 23.3 → 19.6 ms). Its RMS norms there are native code that sums as torch sums
(checked on each norm at load by running it; where no vector width gives the module's bits, the norms and gate | up
stay Python's calls, attention with its residual add one native call and down with its own another).

A span gets it only where it is exact: at load (or its first decode round), `prepare` checks each block's shape (its
modules and their attributes) and then runs a few random rows both ways — the generic path (the family's layer
modules, segments_attention) and this one — on fresh caches; it is used only when every output and every appended key
and value is the same bits (a family whose layer differs in any way — a scaled residual, a norm of its own, no rotary
in some layers — fails there and keeps the generic path; logged). Spans that are not float32 on the CPU always take the
generic path; SWARM_LEAN_DECODE=0 turns it off.

Prefill chunks and mixed rounds (decode rows beside chunks) take it too: a step of T tokens is T rows on its session's
cache, row t at position + t attending to the keys up to its own (each layer appends all of its rows' keys before any
row attends). Each row is then computed as it would be alone, one token per call: `prepare` checks that too (a
fresh prompt and one continuing a prefix, as chunks and as rows one by one: the same bits, or decode rounds only).
Against the generic path's chunk (torch's SDPA over the chunk) it agrees within float32 rounding, not bit for bit.
Why: the layers' own path spends as long around the kernel as in it on a small model: SmolLM2's 30 int4 blocks on a
2-core Xeon with AMX, a 40-token chunk 55.8 → 38.7 ms, 128 tokens 125 → 93 ms (a 16-chat burst's prefill was ~30% of
its peer's compute). SWARM_LEAN_PREFILL=0: decode rounds only (to compare). A round a native call refuses is redone by
the generic path (for a chunk: its bits, within float32 rounding of these).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from swarm.model import lean_checks, segments
from swarm_kernels import attention, cpu, cpu_a8, fused
from swarm_kernels.quant import NativeLinear

logger = logging.getLogger(__name__)

_ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP = {"gate_proj", "up_proj", "down_proj"}
_BLOCK = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_SANDWICH = {"pre_feedforward_layernorm", "post_feedforward_layernorm"}  # Gemma 2/3
_QK_NORMS = {"q_norm", "k_norm"}  # Qwen3, Gemma 3


class Unavailable(Exception):
    """A round the lean path cannot run (a native call refused its tensors): the generic path runs it instead."""


class _Joined:
    """Linear layers that read the same input, as one call: y_i = linears[i](x) for each i.

    Native-kernel layers with the same codes format (bits, input size, bias or none) are computed in one kernel call
    over their joined codes; their own buffers are re-pointed to views of the joined ones. Others are called one by
    one."""

    def __init__(self, linears: list[Any]):
        self.linears = linears
        self.sizes = [layer.out_features for layer in linears]
        self.native = _joinable(linears)
        if not self.native:
            return
        first = linears[0]
        self.bits = first.bits
        self.codes = torch.cat([layer.qweight.reshape(-1) for layer in linears])
        self.scale = torch.cat([layer.scale for layer in linears]).contiguous()
        self.minimum = torch.cat([layer.minimum for layer in linears]).contiguous()
        self.bias = None if first.bias is None else torch.cat([layer.bias.data for layer in linears]).contiguous()
        self.weight = cpu.Weight(self.codes, self.bits, self.scale, self.minimum, self.bias)
        self.weight.follows_activations = all(layer.follows_activations for layer in linears)
        codes_at = rows_at = 0
        for layer in linears:  # each layer's buffers: views of the joined ones (no weight held twice)
            shape, rows = layer.qweight.shape, layer.scale.shape[0]
            count = layer.qweight.numel()
            layer.qweight = self.codes[codes_at : codes_at + count].view(shape)
            layer.scale = self.scale[rows_at : rows_at + rows]
            layer.minimum = self.minimum[rows_at : rows_at + rows]
            if self.bias is not None:
                layer.bias.data = self.bias[rows_at : rows_at + rows]
            codes_at, rows_at = codes_at + count, rows_at + rows
        if cpu.activations() == "int8" and self.weight.follows_activations:  # repacked once, each layer a view
            joined, rows_at = self.weight.int8_activations(), 0
            for layer in linears:
                layer.share_int8_activations(joined.rows(rows_at, layer.out_features))
                rows_at += layer.out_features

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.native:
            return [layer(x) for layer in self.linears]
        return list(self.weight(x).split(self.sizes, dim=-1))


def _joinable(linears: list[Any]) -> bool:
    if len(linears) < 2 or not all(type(layer) is NativeLinear for layer in linears):
        return False
    first = linears[0]
    return all(layer.method == first.method and layer.in_features == first.in_features
               and (layer.bias is None) == (first.bias is None) and layer.qweight.is_contiguous()
               and layer.scale.is_contiguous() and layer.minimum.is_contiguous() for layer in linears)


def _call(module: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """A native-kernel linear layer's computation without its module call; any other module itself."""
    if type(module) is not NativeLinear:
        return module
    weight = cpu.Weight(module.qweight, module.bits, module.scale, module.minimum, module.bias)
    weight.follows_activations = module.follows_activations
    if cpu.activations() == "int8" and module.follows_activations:  # the layer's repacked weight, not a second one
        weight.share_int8_activations(module.int8_activations())
    return weight


Norm = tuple[bool, torch.Tensor, float]  # (Gemma's offset form, the factor, epsilon): see _norm


def _norm(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """An RMS norm as transformers computes it in float32: weight * normalized (Llama's form), or normalized *
    (1 + weight) (Gemma's; the factor 1 + weight is computed once, the same values)."""
    offset, factor, eps = norm
    normalized = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normalized * factor if offset else factor * normalized


def _rms_norm(module: Any, size: int) -> Norm | None:
    """How an RMS norm module of `size` features computes (one of _norm's two forms), found by running it on random
    rows: the form that gives its very bits; None when neither does or it is not an RMS norm of that size."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if (not isinstance(weight, torch.Tensor) or weight.shape != (size,) or weight.dtype != torch.float32
            or not isinstance(eps, float) or list(module.children()) or getattr(module, "bias", None) is not None):
        return None
    x = torch.randn(4, size, generator=torch.Generator().manual_seed(size))
    with torch.inference_mode():
        expected = module(x)
        for norm in ((False, weight, eps), (True, 1.0 + weight.float(), eps)):
            if torch.equal(_norm(x, norm), expected):
                return norm
    return None


class _Layer:
    """What one Llama-shaped block's decode rows need: its norms (a q/k norm on the head dimension, and Gemma's norms
    after attention and around the MLP, where it has them), joined projections, activation and geometry."""

    def __init__(self, block: Any, hidden_size: int):
        attn, mlp = block.self_attn, block.mlp
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self.sandwich = hasattr(block, "pre_feedforward_layernorm")  # Gemma 2/3: a norm after each part too
        pre_mlp = block.pre_feedforward_layernorm if self.sandwich else block.post_attention_layernorm
        norms = {"input": (block.input_layernorm, hidden_size), "pre_mlp": (pre_mlp, hidden_size)}
        if self.sandwich:
            norms |= {"post_attention": (block.post_attention_layernorm, hidden_size),
                      "post_mlp": (block.post_feedforward_layernorm, hidden_size)}
        self.qk_norms = hasattr(attn, "q_norm")
        if self.qk_norms:
            norms |= {"q": (attn.q_norm, self.head_dim), "k": (attn.k_norm, self.head_dim)}
        self.norms: dict[str, Norm] = {}
        for name, (module, size) in norms.items():
            norm = _rms_norm(module, size)
            if norm is None:
                raise ValueError(f"not a Llama-shaped block: its {name} norm is not an RMS norm of {size}")
            self.norms[name] = norm
        self.qkv = _Joined([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = _call(attn.o_proj)
        self.gate_up = _Joined([mlp.gate_proj, mlp.up_proj])
        self.down_proj = _call(mlp.down_proj)
        self.act = mlp.act_fn
        self.kv_heads = self.qkv.sizes[1] // self.head_dim
        # the layer's calls in two (or three) native ones (swarm_kernels.fused), where it is plain (no norm inside a
        # half) and its projections are native-kernel weights: float32 activations' parts, and int8 ones' where the
        # blocks compute with int8 activations (cpu.set_activations before the span is prepared)
        weights = (self.qkv.weight if self.qkv.native else None, _native(self.o_proj),
                   self.gate_up.weight if self.gate_up.native else None, _native(self.down_proj))
        plain = not (self.sandwich or self.qk_norms) and fused.available()
        self.lanes: int | None = None  # the width of torch's sums in the norms (fused.norm_lanes), where one fits
        if plain and all(w is not None for w in weights):
            lanes = {fused.norm_lanes(module, self.norms[name][1], self.norms[name][2])
                     for name, module in (("input", block.input_layernorm), ("pre_mlp", pre_mlp))}
            self.lanes = lanes.pop() if len(lanes) == 1 else None
        no_parts: Parts = (None, None, None)
        self.attention_block, self.down_residual, self.first = self._fuse(weights) if plain else no_parts
        self.int8_parts = no_parts
        if plain and cpu.activations() == "int8" and cpu_a8.available():
            self.int8_parts = self._fuse(tuple(
                None if w is None else w.int8_activations() if w.follows_activations else w for w in weights))

    def parts(self, activations: str) -> Parts:
        """(attention block, down + residual, first half) for blocks computing with these activations."""
        if activations == "float32":
            return self.attention_block, self.down_residual, self.first
        return self.int8_parts if activations == "int8" else (None, None, None)

    def _fuse(self, weights: tuple[Any, ...]) -> Parts:
        qkv, o_proj, gate_up, down = weights
        block = down_residual = first = None
        if qkv is not None and o_proj is not None and self.qkv.sizes[1] == self.qkv.sizes[2]:
            try:
                block = fused.AttentionBlock(qkv, o_proj, self.qkv.sizes[0] // self.head_dim, self.kv_heads,
                                             self.head_dim, self.scaling)
            except ValueError:
                pass
        if down is not None:
            down_residual = fused.ResidualLinear(down)
        # and all of the first half in one (its norms too, where the native norm gives their bits)
        if block is not None and gate_up is not None and down_residual is not None and self.lanes is not None:
            try:
                first = fused.LayerFirst(block, gate_up, self.norms["input"][1:], self.norms["pre_mlp"][1:],
                                         self.lanes)
            except ValueError:  # sizes the C code does not take: the three calls
                pass
        return block, down_residual, first


Parts = tuple["fused.AttentionBlock | None", "fused.ResidualLinear | None", "fused.LayerFirst | None"]


def _native(projection: Any) -> cpu.Weight | None:
    return projection if isinstance(projection, cpu.Weight) else None


def _shaped(block: Any) -> bool:
    """Whether a block is built like a Llama decoder layer, or Gemma 3's (norms after attention and around the MLP, q/k
    norms), with plain SDPA attention (checked again, numerically, by `prepare`)."""
    children = set(dict(block.named_children()))
    if children not in (_BLOCK, _BLOCK | _SANDWICH):
        return False
    attn, mlp = block.self_attn, block.mlp
    if {name for name, _ in attn.named_children()} not in (_ATTENTION, _ATTENTION | _QK_NORMS):
        return False
    if not _MLP <= {name for name, _ in mlp.named_children()} <= _MLP | {"act_fn"}:
        return False
    if not all(isinstance(getattr(attn, name, None), int | float) for name in ("head_dim", "scaling")):
        return False
    if getattr(attn, "attn_logit_softcapping", None) is not None:  # Gemma 2: its eager attention caps the scores
        return False
    config = getattr(attn, "config", None)
    if getattr(config, "_attn_implementation", None) != segments.NAME or getattr(config, segments._ORIGINAL,
                                                                                  None) != "sdpa":
        return False
    linears = [getattr(attn, n) for n in _ATTENTION] + [getattr(mlp, n) for n in _MLP]
    return all(hasattr(layer, "out_features") for layer in linears) and callable(getattr(mlp, "act_fn", None))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# A chunk takes the lean path only while its rows attend to few keys: each row's attention reads its session's keys
# on its own (per head), where the layers' own path runs blocked SDPA over the chunk. A 128-token chunk through
# SmolLM2's 30 int4 blocks on the AMX Xeon: at position 0, 93 vs 125 ms; after 512 cached tokens 229 vs 220, after
# 2048 837 vs 424. So a step of T > 1 tokens at position p is lean only where p + T <= this.
MAX_CHUNK_END = 256


class LeanDecode:
    """Decode rows through a span's Llama-shaped blocks (see the module's doc). Build with `prepare`."""

    def __init__(self, span: Any):
        self.span = span
        self.layers = [_Layer(block, span.hidden_size) for block in span.blocks]
        # prefill chunks and mixed rounds too (their tokens as rows; `prepare` checks them against rows one by one);
        # SWARM_LEAN_PREFILL=0: decode rounds only (to compare)
        self.prefill = os.environ.get("SWARM_LEAN_PREFILL", "1") != "0"

    def takes(self, steps: list[segments.Segment]) -> bool:
        """Whether a round of these steps takes this path: decode rows always, chunks where `prefill` and they end
        within MAX_CHUNK_END tokens."""
        return all(s.tokens == 1 or (self.prefill and s.position + s.tokens <= MAX_CHUNK_END) for s in steps)

    def forward(self, hidden: torch.Tensor, steps: list[segments.Segment], blocks: slice | None) -> torch.Tensor:
        """hidden [1, N, H] holding the steps' tokens one after another (already rewound; N = their tokens) → [1, N, H];
        the caches are not committed. A step of T tokens is T rows on its cache at its positions, each attending to
        the keys up to its own (all of the layer's new keys are appended before any row attends). Raises Unavailable
        where a native call refuses its tensors (nothing committed: the generic path redoes it)."""
        span = self.span
        count = hidden.shape[1]
        selected = range(len(span.blocks))[blocks or slice(None)]
        caches = [s.cache for s in steps for _ in range(s.tokens)]
        positions = [p for s in steps for p in range(s.position, s.position + s.tokens)]
        if len(positions) != count:
            raise ValueError("the steps' tokens are not the rows of hidden")
        position_ids = torch.tensor([positions], device=hidden.device)
        embeddings = {}  # per layer type: cos, sin [1, 1, N, D]
        for kind in {span.layer_types[i] for i in selected}:
            cos, sin = (span.rotary(hidden, position_ids, kind) if span._rotary_per_type
                        else span.rotary(hidden, position_ids))
            embeddings[kind] = cos.unsqueeze(1), sin.unsqueeze(1)
        rows = attention.DecodeRows(list(range(count)), [p + 1 for p in positions])
        parts = {i: self.layers[i].parts(cpu.activations()) for i in selected}
        work = scratch = None
        if any(any(p is not None for p in layer_parts) for layer_parts in parts.values()):
            hidden = hidden.contiguous()
            work = hidden.new_empty(max(_work_floats(parts[i], count) for i in selected))
            scratch = hidden.new_empty(max(_scratch_floats(parts[i], count) for i in selected))
        for i in selected:
            layer, norms = self.layers[i], self.layers[i].norms
            residual = hidden
            block, down, first = parts[i]
            if not rows.check_caches(caches, i, layer.kv_heads, layer.head_dim):  # a cache must grow first
                self._reserve(rows, caches, i, hidden.new_empty(1, layer.kv_heads, 0, layer.head_dim))
            if block is not None and work is not None and scratch is not None:
                cos, sin = embeddings[span.layer_types[i]]
                if first is not None:
                    mid = torch.empty_like(hidden)
                    gate_up = hidden.new_empty(1, count, first.gate_up.n)
                    if first(rows, hidden, mid, gate_up, cos, sin, span.windows[i], work, scratch):
                        gate, up = gate_up.split_with_sizes(layer.gate_up.sizes, dim=-1)
                        hidden = self._down(layer, mid, layer.act(gate) * up, down, work, scratch)
                        continue
                normed = _norm(hidden, norms["input"])
                out = torch.empty_like(hidden)
                if block(rows, normed, residual, out, cos, sin, span.windows[i], work, scratch):
                    hidden = self._mlp(layer, out, down, work, scratch)
                    continue
            q, k, v = layer.qkv(_norm(hidden, norms["input"]))
            q = q.view(1, count, -1, layer.head_dim)  # [1, N, heads, D]: token major
            k = k.view(1, count, -1, layer.head_dim)
            v = v.view(1, count, -1, layer.head_dim)
            if layer.qk_norms:
                q, k = _norm(q, norms["q"]), _norm(k, norms["k"])
            cos, sin = embeddings[span.layer_types[i]]
            rotated = q.new_empty(q.shape)
            if attention.rope(q, cos, sin, rotated) and rows.rope_append(k, v, cos, sin):
                query = rotated.transpose(1, 2)  # both rotated in one native call each, keys into the caches
            else:  # transformers' own expression, heads major
                query, kt = q.transpose(1, 2), k.transpose(1, 2)
                query = (query * cos) + (_rotate_half(query) * sin)
                kt = (kt * cos) + (_rotate_half(kt) * sin)
                if not rows.append(kt, v.transpose(1, 2)):
                    raise Unavailable(f"the native attention refused layer {i}'s keys")
            out = hidden.new_empty(1, count, q.shape[2], layer.head_dim)
            if not rows.attend(query, out, layer.scaling, span.windows[i]):
                raise Unavailable(f"the native attention refused layer {i}'s rows")
            attended = layer.o_proj(out.reshape(1, count, -1).contiguous())
            if layer.sandwich:
                attended = _norm(attended, norms["post_attention"])
            hidden = self._mlp(layer, residual + attended, down, work, scratch)
        return hidden

    @staticmethod
    def _reserve(rows: attention.DecodeRows, caches: list[Any], layer: int, like: torch.Tensor) -> None:
        """Grow the layer's buffers of the rows' caches to hold their rows (each cache once, to its last row's length:
        a step's rows share it) and take them for the native calls (`like`: [1, kv_heads, 0, D])."""
        ends: dict[int, int] = {}
        for cache, n in zip(caches, rows.lengths, strict=True):
            ends[id(cache)] = max(ends.get(id(cache), 0), n)
        distinct = {id(c): c for c in caches}
        buffers = {key: cache.reserve(like, like, layer, ends[key]) for key, cache in distinct.items()}
        if rows.check_caches(caches, layer, like.shape[1], like.shape[3]):  # their records, taken as they grew
            return
        if not rows.check([buffers[id(c)][0] for c in caches], [buffers[id(c)][1] for c in caches]):
            raise Unavailable(f"the native attention refused layer {layer}'s cache buffers")

    @staticmethod
    def _mlp(layer: _Layer, hidden: torch.Tensor, down: fused.ResidualLinear | None, work: torch.Tensor | None,
             scratch: torch.Tensor | None) -> torch.Tensor:
        """The layer's MLP half: hidden + mlp(norm(hidden)); its down projection and the residual add in one native
        call where `down` is given (see LeanDecode.forward)."""
        gate, up = layer.gate_up(_norm(hidden, layer.norms["pre_mlp"]))
        return LeanDecode._down(layer, hidden, layer.act(gate) * up, down, work, scratch)

    @staticmethod
    def _down(layer: _Layer, hidden: torch.Tensor, inner: torch.Tensor, down: fused.ResidualLinear | None,
              work: torch.Tensor | None, scratch: torch.Tensor | None) -> torch.Tensor:
        """hidden + down(inner) (Gemma's norm after the MLP between them, where it has one)."""
        if down is not None and work is not None and scratch is not None:
            out = torch.empty_like(hidden)
            if down(inner, hidden, out, work, scratch):
                return out
        mlp = layer.down_proj(inner)
        if layer.sandwich:
            mlp = _norm(mlp, layer.norms["post_mlp"])
        return hidden + mlp


def _work_floats(parts: Parts, rows: int) -> int:
    return max([1] + [p.work_floats(rows) for p in parts if p is not None])


def _scratch_floats(parts: Parts, rows: int) -> int:
    return max([1] + [p.scratch_floats(rows) for p in parts if p is not None])


def eligible(span: Any) -> bool:
    """Whether a span may take the lean path at all (before its numerical check). SWARM_LEAN_DECODE=0: never (to
    compare)."""
    return (os.environ.get("SWARM_LEAN_DECODE", "1") != "0" and span.mixes and span._native_rows
            and span.rotary is not None and attention.available() and all(_shaped(block) for block in span.blocks))


def prepare(span: Any) -> LeanDecode | None:
    """The span's lean decode path, or None where it is not the same bits as the generic one (see the module's doc).
    Joins the projections' buffers (views: the generic path reads the same weights)."""
    if not eligible(span):
        return None
    try:
        lean = LeanDecode(span)
    except ValueError as e:  # e.g. OLMo's norms: layer norms without weights
        logger.debug("blocks %d:%d keep the generic decode path: %s", span.start, span.end, e)
        return None
    try:
        same = lean_checks.same_bits(span, lean)
    except Exception:  # an optimization: whatever it meets, the layers' own path serves
        logger.warning("blocks %d:%d: the lean decode path failed its check; keeping the generic path", span.start,
                       span.end, exc_info=True)
        return None
    if not same:
        logger.info("blocks %d:%d: the lean decode path differs from the layers' own; keeping the generic path",
                    span.start, span.end)
        return None
    if lean.prefill:
        try:
            rows = lean_checks.rows_same_bits(span, lean)
        except Exception:  # decode rounds keep the path they passed
            logger.warning("blocks %d:%d: prefill chunks' lean check failed; decode rounds only", span.start,
                           span.end, exc_info=True)
            rows = False
        if not rows:
            logger.info("blocks %d:%d: prefill chunks as lean rows differ from rows one by one; decode rounds only",
                        span.start, span.end)
            lean.prefill = False
    return lean
