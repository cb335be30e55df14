"""The lean decode path (swarm.model.lean): the same bits as the layers' own, taken only where it is."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from swarm.model import lean, lean_checks
from swarm.model.source import ModelSource
from swarm.model.span import load_span
from swarm_kernels import attention, cpu
from swarm_kernels.quant import NativeLinear, quantize_linears

pytestmark = pytest.mark.skipif(not attention.available(), reason="no C compiler: the native kernels are unavailable")


def span_of(tiny_model_dir, family: str, quant: str, blocks: tuple[int, int] = (0, 4)):
    source = ModelSource(family, tiny_model_dir(family))
    if quant == "none":
        return load_span(source, *blocks)
    span = load_span(source, *blocks, pack=False)
    for block in span.blocks:
        quantize_linears(block, quant, "native")
    return span


def decode_both_ways(span, rounds: int = 3, lengths=(9, 2, 6, 1), blocks: slice | None = None):
    """The same decode rounds through the lean path and the generic one, each on its own caches: (outputs, caches)
    per way."""
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, n, span.hidden_size, generator=g) for n in lengths]
    steps = [torch.randn(len(prompts), 1, span.hidden_size, generator=g) for _ in range(rounds)]
    results = {}
    for way in (True, False):
        caches = [span.new_cache(32) for _ in prompts]
        for p, c in zip(prompts, caches, strict=True):
            span(p, c, 0)
        outputs = [span.forward_batch(step, caches, [c.length for c in caches], blocks, lean=way) for step in steps]
        results[way] = (torch.cat(outputs), caches)
    return results


def kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    keys, values = cache.reserve(torch.empty(0), torch.empty(0), layer, cache.length)
    return keys[:, :, : cache.length], values[:, :, : cache.length]


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
# qwen2: biases on q, k, v; qwen3: q/k norms; gemma: norms of (1 + weight); gemma3: those, norms after attention and
# around the MLP, sliding layers with their own rotary
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3_text"])
def test_lean_decode_is_the_same_bits_as_the_layers_own(tiny_model_dir, family, quant):
    span = span_of(tiny_model_dir, family, quant)
    assert span.prepare_lean()
    got = decode_both_ways(span)
    (lean_out, lean_caches), (own_out, own_caches) = got[True], got[False]
    assert torch.equal(lean_out, own_out), (lean_out - own_out).abs().max()
    for a, b in zip(lean_caches, own_caches, strict=True):
        assert a.length == b.length
        for layer in range(len(span.blocks)):
            assert all(torch.equal(x, y) for x, y in zip(kv(a, layer), kv(b, layer), strict=True))


@pytest.mark.parametrize("quant", ["none", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
def test_lean_decode_on_16_bit_caches_is_the_same_bits_as_the_layers_own(tiny_model_dir, family, quant):
    # --kv-dtype float16: the native calls read and write the halves, the layers get them back as float32
    span = span_of(tiny_model_dir, family, quant)
    span.set_kv_dtype("float16")
    assert span.prepare_lean() and span.runs_lean
    got = decode_both_ways(span)
    (lean_out, lean_caches), (own_out, own_caches) = got[True], got[False]
    assert torch.equal(lean_out, own_out), (lean_out - own_out).abs().max()
    for a, b in zip(lean_caches, own_caches, strict=True):
        assert a.length == b.length and a.nbytes() == b.nbytes()
        assert all(record is not None and record[7] == 1 for record in a.native)  # what the native calls read
        for layer in range(len(span.blocks)):
            assert all(x.dtype == torch.float16 and torch.equal(x, y)
                       for x, y in zip(kv(a, layer), kv(b, layer), strict=True))
    # and close to float32 caches (the halves' rounding, not a wrong value)
    span.set_kv_dtype("float32")
    full = decode_both_ways(span)[True][0]
    assert (full - lean_out).norm() / full.norm() < 1e-2


@pytest.mark.parametrize("family", ["gemma2", "gpt2", "phi3"])
def test_16_bit_caches_serve_families_whose_attention_is_their_own(tiny_model_dir, family):
    # soft-capping, eager attention: the decode rows' keys are appended natively into the halves, and the family's
    # own function reads them back as float32 (it once got float16 keys beside a float32 query: a crash)
    span = span_of(tiny_model_dir, family, "none")
    span.set_kv_dtype("float16")
    half = decode_both_ways(span)[False][0]
    span.set_kv_dtype("float32")
    full = decode_both_ways(span)[False][0]
    assert half.dtype == torch.float32 and (full - half).norm() / full.norm() < 1e-2


def test_16_bit_caches_are_only_for_float32_cpu_spans(tiny_model_dir):
    span = span_of(tiny_model_dir, "llama", "none")
    with pytest.raises(ValueError, match="expected float32 or float16"):
        span.set_kv_dtype("bfloat16")
    span.precision = dataclasses.replace(span.precision, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 spans on the CPU"):
        span.set_kv_dtype("float16")


def test_lean_decode_keeps_its_bits_where_the_native_rotary_embedding_does_not_apply(tiny_model_dir, monkeypatch):
    # torch's own expression then: the rows' keys appended after it, the same bits either way (the layers' calls one
    # by one: the fused ones rotate in C)
    monkeypatch.setenv("SWARM_FUSED_DECODE", "0")
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    native = decode_both_ways(span)[True]
    calls = []
    monkeypatch.setattr(attention, "rope", lambda *args: calls.append(1) and False)
    fallback = decode_both_ways(span)[True]
    assert calls and torch.equal(native[0], fallback[0])
    for a, b in zip(native[1], fallback[1], strict=True):
        for layer in range(len(span.blocks)):
            assert all(torch.equal(x, y) for x, y in zip(kv(a, layer), kv(b, layer), strict=True))


def test_a_part_of_the_span_runs_lean_too(tiny_model_dir):
    span = span_of(tiny_model_dir, "llama", "int4", (0, 6))
    got = decode_both_ways(span, rounds=2, blocks=slice(2, 5))
    assert torch.equal(got[True][0], got[False][0])


def test_joined_projections_hold_no_weight_twice_and_are_one_call(tiny_model_dir, monkeypatch):
    """(With the fused calls off: they make the same kernel calls from C; tests/unit/test_fused.py.)"""
    monkeypatch.setenv("SWARM_FUSED_DECODE", "0")
    span = span_of(tiny_model_dir, "llama", "int4")
    before = span.weight_bytes()
    assert span.prepare_lean()
    assert span.weight_bytes() == before
    plan = span._lean
    attn = span.blocks[0].self_attn
    joined = plan.layers[0].qkv
    shared = joined.codes.untyped_storage().data_ptr()
    assert joined.native and attn.q_proj.qweight.untyped_storage().data_ptr() == shared
    assert attn.v_proj.scale.data_ptr() == joined.scale[-attn.v_proj.out_features :].data_ptr()
    calls = []
    real = cpu._call  # every kernel call: affine_linear's and a cpu.Weight's
    monkeypatch.setattr(cpu, "_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = span.new_cache(8)
    span(torch.randn(1, 3, span.hidden_size), cache, 0)
    calls.clear()
    span(torch.randn(1, 1, span.hidden_size), cache, 3)
    assert len(calls) == 4 * len(span.blocks)  # q|k|v, o, gate|up, down


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text"])
def test_int8_activations_keep_the_same_bits_and_one_repacked_weight(tiny_model_dir, family, quant):
    """With the projections on int8 activations (a peer's --activations int8) the lean path still computes the
    layers' own bits, and each projection is repacked once: a joined call's layers use views of its weight, o and
    down their layer's own."""
    saved = cpu.activations()
    try:
        cpu.set_activations("int8")
        span = span_of(tiny_model_dir, family, quant)
        assert span.prepare_lean()
        got = decode_both_ways(span)
        assert torch.equal(got[True][0], got[False][0]), (got[True][0] - got[False][0]).abs().max()
        cpu.set_activations("float32")
        floats = decode_both_ways(span)[True][0]
        assert not torch.equal(floats, got[True][0])  # it did compute with int8 activations
        layer, block = span._lean.layers[0], span.blocks[0]
        joined = layer.qkv.weight.int8_activations()
        shared = joined.codes.untyped_storage().data_ptr()
        for projection in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
            own = projection.int8_activations()
            aligned = own.n == projection.out_features and projection.out_features % 16 == 0
            assert not aligned or own.codes.untyped_storage().data_ptr() == shared
        assert layer.o_proj.int8_activations() is block.self_attn.o_proj.int8_activations()
        assert layer.down_proj.int8_activations() is block.mlp.down_proj.int8_activations()
    finally:
        cpu.set_activations(saved)


@pytest.mark.parametrize("family", ["granite", "smollm3"])
def test_a_layer_that_differs_is_caught_by_the_check(tiny_model_dir, family):
    # shaped like Llama's, computed otherwise: granite scales its residuals, smollm3's 4th layer has no rotary
    span = span_of(tiny_model_dir, family, "none")
    assert lean.eligible(span)
    assert not span.prepare_lean()
    got = decode_both_ways(span, rounds=1)
    assert torch.equal(got[True][0], got[False][0])  # both the layers' own


@pytest.mark.parametrize("family", ["gemma2", "mixtral", "phi3", "olmo"])
def test_other_shapes_keep_the_generic_path(tiny_model_dir, family):
    # gemma2 caps its attention scores; mixtral routes to experts; phi3 joins q, k, v itself; olmo's norms have no
    # weights (shaped like Llama's otherwise)
    span = span_of(tiny_model_dir, family, "none")
    assert lean.eligible(span) == (family == "olmo")
    assert not span.prepare_lean() and not span.runs_lean  # a peer's --kv-dtype auto keeps float32 caches here


def test_a_round_the_native_attention_refuses_is_redone_by_the_generic_path(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SWARM_FUSED_DECODE", "0")  # the calls one by one (tests/unit/test_fused.py: the fused ones)
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    expected = decode_both_ways(span, rounds=2)[False][0]
    refused = []
    real = attention.DecodeRows.attend

    def attend_once_refused(self, *args):
        if not refused and self.count == 4:  # a decode round's first layer: its keys were appended, nothing committed
            refused.append(1)
            return False
        return real(self, *args)

    monkeypatch.setattr(attention.DecodeRows, "attend", attend_once_refused)
    got = decode_both_ways(span, rounds=2)[True][0]
    assert refused and torch.equal(got, expected)


def test_native_linear_views_still_compute_alone(tiny_model_dir):
    # the projections' own modules (prefill chunks run them) read the joined buffers' views
    span = span_of(tiny_model_dir, "qwen2", "int4")
    x = torch.randn(5, span.hidden_size)
    attn = span.blocks[1].self_attn
    alone = [layer(x) for layer in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert span.prepare_lean()
    assert all(isinstance(layer, NativeLinear) for layer in (attn.q_proj, attn.k_proj, attn.v_proj))
    assert all(torch.equal(layer(x), want) for layer, want in zip((attn.q_proj, attn.k_proj, attn.v_proj), alone,
                                                                  strict=True))


def test_the_switch_turns_it_off(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SWARM_LEAN_DECODE", "0")
    span = span_of(tiny_model_dir, "llama", "none")
    assert not lean.eligible(span) and not span.prepare_lean()


def test_a_check_that_raises_keeps_the_generic_path(tiny_model_dir, monkeypatch):
    def broken(span, plan):
        raise RuntimeError("a bug in the check")

    monkeypatch.setattr(lean_checks, "same_bits", broken)
    span = span_of(tiny_model_dir, "llama", "int4")
    assert not span.prepare_lean()
    got = decode_both_ways(span, rounds=1)
    assert torch.equal(got[True][0], got[False][0])
