"""A decode layer in two native calls (swarm_kernels.fused): the lean path's bits, its norms torch's own."""

from __future__ import annotations

import pytest
import torch

from swarm_kernels import attention, cpu, cpu_a8, fused
from tests.unit.test_lean import decode_both_ways, kv, span_of

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C compiler: the native kernels are unavailable")


def torch_norm(x: torch.Tensor, factor: torch.Tensor, eps: float) -> torch.Tensor:
    return factor * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("size", [16, 33, 64, 100, 576, 960, 2048, 2304, 4096, 5120, 8192])
def test_the_native_norm_is_torchs_bits(size):
    """The sum of squares in torch's order (its cascade of accumulators at its vector width): the same bits as
    torch's mean for rows of every size and scale, where one width matches here (the fused layer is used only then)."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(1, 40, size, generator=g) * torch.logspace(-4, 4, 40)[None, :, None]
    factor = torch.randn(size, generator=g)
    want = torch_norm(x, factor, 1e-6)
    widths = [lanes for lanes in fused.SUM_LANES if torch.equal(fused.rms_norm(x, factor, 1e-6, lanes), want)]
    assert len(widths) == 1  # torch 2.13 sums float32 rows 8 wide on x86, on AVX-512 machines too (measured)
    (other,) = set(fused.SUM_LANES) - set(widths)
    wrong = fused.rms_norm(x, factor, 1e-6, other)
    assert not torch.equal(wrong, want)  # the order matters: a check that can fail
    assert torch.allclose(wrong, want, rtol=1e-5, atol=0)


def test_the_width_is_found_by_running_the_norm():
    factor = torch.randn(96)
    assert fused.norm_lanes(lambda x: torch_norm(x, factor, 1e-5), factor, 1e-5) in fused.SUM_LANES
    assert fused.norm_lanes(lambda x: torch_norm(x, factor, 1e-5) + 1e-3, factor, 1e-5) is None


@pytest.mark.parametrize("quant", ["int8", "int4"])
# qwen2: biases on q, k, v; gemma: norms of (1 + weight) and a GELU; mistral: a sliding window
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma"])
def test_every_layer_is_fused_and_the_same_bits_as_the_layers_own(tiny_model_dir, family, quant, monkeypatch):
    span = span_of(tiny_model_dir, family, quant)
    assert span.prepare_lean()
    assert all(layer.first is not None for layer in span._lean.layers)
    got = decode_both_ways(span, rounds=4)
    (lean_out, lean_caches), (own_out, own_caches) = got[True], got[False]
    assert torch.equal(lean_out, own_out), (lean_out - own_out).abs().max()
    for a, b in zip(lean_caches, own_caches, strict=True):
        for layer in range(len(span.blocks)):
            assert all(torch.equal(x, y) for x, y in zip(kv(a, layer), kv(b, layer), strict=True))
    calls = []
    real = cpu._call  # a projection computed from Python: none where the fused calls run
    monkeypatch.setattr(cpu, "_call", lambda *a, **k: calls.append(1) or real(*a, **k))
    step = torch.randn(len(lean_caches), 1, span.hidden_size)
    span.forward_batch(step, lean_caches, [c.length for c in lean_caches], lean=True)
    assert calls == []


def rounds_crossing_growth(span, lean: bool, windows: list[int | None]) -> tuple[torch.Tensor, list]:
    """Decode rounds of sessions that cross their caches' first growth (128 tokens), on fresh caches."""
    span.windows = windows
    g = torch.Generator().manual_seed(5)
    caches = [span.new_cache(200) for _ in range(3)]
    for n, cache in zip((126, 4, 127), caches, strict=True):
        span(torch.randn(1, n, span.hidden_size, generator=g), cache, 0)
    steps = [torch.randn(3, 1, span.hidden_size, generator=g) for _ in range(5)]
    out = [span.forward_batch(step, caches, [c.length for c in caches], lean=lean) for step in steps]
    return torch.cat(out), caches


def test_fused_and_step_by_step_are_the_same_bits_as_caches_grow(tiny_model_dir, monkeypatch):
    """Rounds that cross the caches' growth (that layer's round goes step by step: its buffers are reserved from
    Python) and a sliding window shorter than the sessions on every other layer."""
    windows = [5 if i % 2 else None for i in range(4)]
    span = span_of(tiny_model_dir, "mistral", "int4")
    assert span.prepare_lean()
    fused_out, fused_caches = rounds_crossing_growth(span, True, windows)
    generic_out, generic_caches = rounds_crossing_growth(span, False, windows)
    monkeypatch.setenv("SWARM_FUSED_DECODE", "0")
    plain = span_of(tiny_model_dir, "mistral", "int4")
    assert plain.prepare_lean() and all(layer.first is None for layer in plain._lean.layers)
    step_out, _ = rounds_crossing_growth(plain, True, windows)
    assert torch.equal(fused_out, step_out) and torch.equal(fused_out, generic_out)
    assert [c.length for c in fused_caches] == [c.length for c in generic_caches] == [131, 9, 132]
    for a, b in zip(fused_caches, generic_caches, strict=True):
        for layer in range(len(span.blocks)):
            assert all(torch.equal(x, y) for x, y in zip(kv(a, layer), kv(b, layer), strict=True))


def test_buffers_that_do_not_fit_are_refused_and_nothing_is_written(tiny_model_dir):
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    layer = span._lean.layers[0]
    first, hidden = layer.first, span.hidden_size
    cache = span.new_cache(16)
    span(torch.randn(1, 3, hidden), cache, 0)
    rows = attention.DecodeRows([0], [4])
    assert rows.check_caches([cache], 0, layer.kv_heads, layer.head_dim)
    cos, sin = span.rotary(torch.zeros(1, 1, hidden), torch.tensor([[3]]))
    x, mid = torch.randn(1, 1, hidden), torch.full((1, 1, hidden), 7.0)
    gate_up = torch.empty(1, 1, layer.gate_up.weight.n)
    work, scratch = torch.empty(first.work_floats(1)), torch.empty(first.scratch_floats(1))
    keys_before = kv(cache, 0)[0].clone()
    for bad in (dict(x=torch.randn(1, 2, hidden)), dict(mid=torch.empty(1, 1, hidden, dtype=torch.float64)),
                dict(work=torch.empty(first.work_floats(1) - 1)), dict(scratch=torch.empty(0)),
                dict(gate_up=torch.empty(1, 1, 3)), dict(cos=cos[..., :-1])):
        args = dict(x=x, mid=mid, gate_up=gate_up, cos=cos, sin=sin, work=work, scratch=scratch) | bad
        assert not first(rows, args["x"], args["mid"], args["gate_up"], args["cos"], args["sin"], None, args["work"],
                         args["scratch"])
        assert torch.equal(mid, torch.full((1, 1, hidden), 7.0))
    assert torch.equal(kv(cache, 0)[0], keys_before)
    assert not first(attention.DecodeRows([0], [4]), x, mid, gate_up, cos, sin, None, work, scratch)  # unchecked rows
    assert first(rows, x, mid, gate_up, cos, sin, None, work, scratch)
    with pytest.raises(ValueError):
        fused.AttentionBlock(layer.qkv.weight, layer.o_proj, 3, 1, layer.head_dim, 1.0)


def test_a_call_the_attention_refuses_leaves_what_the_next_one_overwrites(tiny_model_dir):
    """A refusal inside the C code (here: a window of no keys) comes after the rows' keys and values went into their
    caches; the call that follows (the step-by-step path, or this one) writes the same positions again: the same
    result as on caches that never saw the refused call."""
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    layer, hidden = span._lean.layers[0], span.hidden_size
    first = layer.first
    prompt, x = torch.randn(1, 5, hidden), torch.randn(1, 1, hidden)
    cos, sin = span.rotary(torch.zeros(1, 1, hidden), torch.tensor([[5]]))
    results = []
    for refuse_first in (True, False):
        cache = span.new_cache(16)
        span(prompt, cache, 0)
        rows = attention.DecodeRows([0], [6])
        assert rows.check_caches([cache], 0, layer.kv_heads, layer.head_dim)
        mid, gate_up = torch.empty(1, 1, hidden), torch.empty(1, 1, layer.gate_up.weight.n)
        work, scratch = torch.empty(first.work_floats(1)), torch.empty(first.scratch_floats(1))
        if refuse_first:
            assert not first(rows, x, mid, gate_up, cos, sin, 0, work, scratch)
        assert first(rows, x, mid, gate_up, cos, sin, None, work, scratch)
        keys, values = cache.reserve(torch.empty(0), torch.empty(0), 0, 6)
        results.append((mid.clone(), gate_up.clone(), keys[:, :, :6].clone(), values[:, :, :6].clone()))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_int8_activations_take_the_fused_calls_too(tiny_model_dir, family, quant, monkeypatch):
    """Blocks on int8 activations (a peer's --activations int8): the same fused calls with cpu_a8's kernel, the
    layers' own bits (their projections on int8 activations too), no projection called from Python."""
    saved = cpu.activations()
    try:
        cpu.set_activations("int8")
        span = span_of(tiny_model_dir, family, quant)
        assert span.prepare_lean()
        assert all(layer.int8_parts[2] is not None for layer in span._lean.layers)
        got = decode_both_ways(span, rounds=3)
        assert torch.equal(got[True][0], got[False][0]), (got[True][0] - got[False][0]).abs().max()
        for a, b in zip(got[True][1], got[False][1], strict=True):
            for layer in range(len(span.blocks)):
                assert all(torch.equal(x, y) for x, y in zip(kv(a, layer), kv(b, layer), strict=True))
        calls = []
        real = cpu_a8.Weight.__call__
        monkeypatch.setattr(cpu_a8.Weight, "__call__", lambda *a, **k: calls.append(1) or real(*a, **k))
        caches = got[True][1]
        span.forward_batch(torch.randn(len(caches), 1, span.hidden_size), caches, [c.length for c in caches],
                           lean=True)
        assert calls == []
        cpu.set_activations("float32")
        floats = decode_both_ways(span, rounds=3)[True][0]
        assert not torch.equal(floats, got[True][0])  # int8 activations did compute
    finally:
        cpu.set_activations(saved)
