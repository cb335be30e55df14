"""Prefill chunks and mixed rounds through the lean path (swarm.model.lean): a step's tokens as rows on its cache."""

from __future__ import annotations

import pytest
import torch

from swarm.model import lean, lean_checks, segments
from swarm.model.span import SpanKVCache
from swarm_kernels import attention, cpu
from tests.unit.test_lean import kv, span_of

pytestmark = pytest.mark.skipif(not attention.available(), reason="no C compiler: the native kernels are unavailable")


@pytest.fixture
def no_tile_unit():
    """The kernel's AVX-512 path for every call (on a CPU with AMX, calls of five rows or more would take the tile
    unit: float32-accurate, other bits than rows one by one; swarm_kernels/cpu_amx.h)."""
    tile_unit = cpu.amx()
    cpu.set_amx(False)
    yield
    cpu.set_amx(bool(tile_unit))


def lean_calls(monkeypatch) -> list[list[int]]:
    """Each LeanDecode.forward call's step sizes, from now on."""
    calls: list[list[int]] = []
    real = lean.LeanDecode.forward

    def spy(self, hidden, steps, blocks):
        out = real(self, hidden, steps, blocks)  # (a round it raised Unavailable for went generic: not counted)
        calls.append([s.tokens for s in steps])
        return out

    monkeypatch.setattr(lean.LeanDecode, "forward", spy)
    return calls


@pytest.mark.parametrize("quant", ["none", "int4"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_mixed_rounds_match_the_layers_own_within_float32_rounding(tiny_model_dir, monkeypatch, family, quant):
    """Decode rows, a fresh prompt and a prompt continuing a cached prefix (after a rewind) in one forward, lean and
    generic, each on its own caches: the same outputs and caches within float32 rounding (the generic path's attention
    is torch's SDPA over the chunk, the lean one each row's own over its keys)."""
    span = span_of(tiny_model_dir, family, quant)
    assert span.prepare_lean() and span._lean.prefill
    g = torch.Generator().manual_seed(5)
    history = [torch.randn(1, n, span.hidden_size, generator=g) for n in (7, 3, 0, 6)]
    ways = {way: [span.new_cache(32) for _ in history] for way in (True, False)}
    for way, caches in ways.items():
        for h, c in zip(history, caches, strict=True):
            if h.shape[1]:
                span.forward_mixed(h, [segments.Segment(c, 0, h.shape[1])], lean=way)
    calls = lean_calls(monkeypatch)
    plan = [(0, 1, 7), (1, 1, 3), (2, 5, 0), (3, 4, 4)]  # (session, tokens, position): the last rewinds 2 tokens
    for _ in range(2):
        x = torch.randn(1, sum(t for _, t, _ in plan), span.hidden_size, generator=g)
        out = {way: span.forward_mixed(x, [segments.Segment(caches[i], p, t) for i, t, p in plan], lean=way)
               for way, caches in ways.items()}
        torch.testing.assert_close(out[True], out[False], atol=1e-5, rtol=1e-5)
        plan = [(i, 1, ways[True][i].length) for i, _, _ in plan]  # then every session decodes
    assert calls[0] == [1, 1, 5, 4] and calls[1] == [1, 1, 1, 1]  # both rounds took the lean path
    for a, b in zip(ways[True], ways[False], strict=True):
        assert a.length == b.length
        for layer in range(len(span.blocks)):
            for mine, theirs in zip(kv(a, layer), kv(b, layer), strict=True):
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant", ["none", "int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_chunk_is_the_bits_of_its_tokens_one_row_at_a_time(tiny_model_dir, no_tile_unit, family, quant):
    """A 9-token prompt in one call, and 4 more continuing it, against the same 13 tokens one decode row per call:
    the same bits, outputs and caches (each row is computed as alone). Gemma 3's sliding layers (window 4 in the tiny
    config, or whatever it holds) see the same window either way."""
    span = span_of(tiny_model_dir, family, quant)
    assert span.prepare_lean() and span._lean.prefill
    x = torch.randn(1, 13, span.hidden_size, generator=torch.Generator().manual_seed(2))
    chunked, rows = span.new_cache(64), span.new_cache(64)
    got = torch.cat([span(x[:, :9], chunked, 0), span(x[:, 9:], chunked, 9)], dim=1)
    want = torch.cat([span(x[:, t : t + 1], rows, t) for t in range(13)], dim=1)
    assert torch.equal(got, want), (got - want).abs().max()
    for layer in range(len(span.blocks)):
        assert all(torch.equal(a, b) for a, b in zip(kv(chunked, layer), kv(rows, layer), strict=True))


def test_a_cache_growing_inside_a_chunk_keeps_every_rows_keys(tiny_model_dir, no_tile_unit):
    """Rows of one chunk on both sides of the cache's growth (its buffers reallocated once, to the chunk's end): every
    key and value lands in the grown buffers, as with rows one by one; and a chunk beside another session's rows."""
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    grow = SpanKVCache.GROW
    g = torch.Generator().manual_seed(9)
    prefix = torch.randn(1, grow - 2, span.hidden_size, generator=g)
    chunk = torch.randn(1, 6, span.hidden_size, generator=g)
    other = torch.randn(1, 1, span.hidden_size, generator=g)
    together = [span.new_cache(4 * grow), span.new_cache(4 * grow)]
    alone = [span.new_cache(4 * grow), span.new_cache(4 * grow)]
    for caches in (together, alone):
        span(prefix, caches[0], 0)
        span(prefix[:, :5], caches[1], 0)
    got = span.forward_mixed(torch.cat([chunk, other], dim=1), [segments.Segment(together[0], grow - 2, 6),
                                                               segments.Segment(together[1], 5, 1)])
    want = torch.cat([span(chunk[:, t : t + 1], alone[0], grow - 2 + t) for t in range(6)]
                     + [span(other, alone[1], 5)], dim=1)
    assert torch.equal(got, want)
    assert together[0].length == grow + 4
    for a, b in zip(together, alone, strict=True):
        for layer in range(len(span.blocks)):
            assert all(torch.equal(p, q) for p, q in zip(kv(a, layer), kv(b, layer), strict=True))


def test_a_chunk_past_the_few_keys_limit_takes_the_layers_own_path(tiny_model_dir, monkeypatch):
    """Rows attending to many keys each read them on their own: past lean.MAX_CHUNK_END a chunk (and its round) goes
    the generic way; decode rows there stay lean."""
    monkeypatch.setattr(lean, "MAX_CHUNK_END", 12)
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    calls = lean_calls(monkeypatch)
    g = torch.Generator().manual_seed(6)
    a, b = span.new_cache(32), span.new_cache(32)
    span(torch.randn(1, 8, span.hidden_size, generator=g), a, 0)
    span(torch.randn(1, 4, span.hidden_size, generator=g), a, 8)  # ends at 12: lean
    span(torch.randn(1, 3, span.hidden_size, generator=g), a, 12)  # ends at 15: generic
    span(torch.randn(1, 1, span.hidden_size, generator=g), a, 15)  # a decode row: lean
    span(torch.randn(1, 13, span.hidden_size, generator=g), b, 0)
    x = torch.randn(1, 3, span.hidden_size, generator=g)
    span.forward_mixed(x, [segments.Segment(a, 16, 1), segments.Segment(b, 13, 2)])  # b's chunk ends at 15: generic
    assert calls == [[8], [4], [1]]
    assert a.length == 17 and b.length == 15


def test_the_switch_keeps_prefill_on_the_layers_own_path(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SWARM_LEAN_PREFILL", "0")
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean() and not span._lean.prefill
    calls = lean_calls(monkeypatch)
    x = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(4))
    a, b = span.new_cache(16), span.new_cache(16)
    got = span(x, a, 0)
    assert calls == []
    assert torch.equal(got, span.forward_mixed(x, [segments.Segment(b, 0, 5)], lean=False))
    span(x[:, :1], a, 5)
    assert calls == [[1]]  # decode rows still lean


@pytest.mark.parametrize("outcome", ["differs", "raises"])
def test_a_prefill_check_that_fails_keeps_decode_lean_only(tiny_model_dir, monkeypatch, outcome):
    def check(span, plan):
        if outcome == "raises":
            raise lean.Unavailable("a native call refused the check's rows")
        return False

    monkeypatch.setattr(lean_checks, "rows_same_bits", check)
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean() and not span._lean.prefill
    calls = lean_calls(monkeypatch)
    cache = span.new_cache(16)
    span(torch.randn(1, 4, span.hidden_size), cache, 0)
    span(torch.randn(1, 1, span.hidden_size), cache, 4)
    assert calls == [[1]]


def test_a_chunk_the_native_attention_refuses_is_redone_by_the_generic_path(tiny_model_dir, monkeypatch):
    """A round refused at its first layer, after that layer appended its rows' keys (and grew a fresh cache): nothing
    committed, the generic path computes the round from the same cached prefix, as a round it was given at once."""
    monkeypatch.setenv("SWARM_FUSED_DECODE", "0")  # (the calls one by one: the fused ones attend from C)
    span = span_of(tiny_model_dir, "llama", "int4")
    assert span.prepare_lean()
    g = torch.Generator().manual_seed(12)
    prefix = torch.randn(1, 3, span.hidden_size, generator=g)
    x = torch.randn(1, 7, span.hidden_size, generator=g)
    steps = {way: [span.new_cache(16), span.new_cache(16)] for way in ("refused", "generic")}
    for a, _ in steps.values():
        span(prefix, a, 0)
    refused = []
    real = attention.DecodeRows.attend

    def attend_once_refused(self, *args):
        if not refused and self.count == 7:
            refused.append(1)
            return False
        return real(self, *args)

    monkeypatch.setattr(attention.DecodeRows, "attend", attend_once_refused)
    out = {}
    for way, (a, b) in steps.items():
        plan = [segments.Segment(a, 3, 2), segments.Segment(b, 0, 5)]
        out[way] = span.forward_mixed(x, plan, lean=way == "refused")
    assert refused and torch.equal(out["refused"], out["generic"])
    for way in steps:
        assert [c.length for c in steps[way]] == [5, 5]
    for layer in range(len(span.blocks)):
        for mine, theirs in zip(steps["refused"], steps["generic"], strict=True):
            assert all(torch.equal(p, q) for p, q in zip(kv(mine, layer), kv(theirs, layer), strict=True))
