"""The checks `swarm.model.lean.prepare` runs at load before a span takes the lean path: decode rounds the same bits as
the layers' own path, and prefill chunks as rows the same bits as their tokens one row at a time."""

from __future__ import annotations

from typing import Any

import torch

from swarm.model import segments


@torch.inference_mode()
def same_bits(span: Any, lean: Any) -> bool:
    """A few rows of sessions of different lengths, one decode round each way, on fresh caches; then a second round
    from there."""
    from swarm.model.lean import Unavailable  # (that module imports this one)

    g = torch.Generator().manual_seed(1234)
    lengths = (2, 5, 3)
    prompts = [torch.randn(1, n, span.hidden_size, generator=g) for n in lengths]
    generic, mine = [span.new_cache(16) for _ in prompts], [span.new_cache(16) for _ in prompts]
    for prompt, a, b in zip(prompts, generic, mine, strict=True):
        span.forward(prompt, a, 0)  # several tokens: the generic path
        span.forward(prompt, b, 0)
    for _ in range(2):
        x = torch.randn(1, len(prompts), span.hidden_size, generator=g)
        want = span.forward_mixed(x, [segments.Segment(c, c.length, 1) for c in generic], lean=False)
        steps = [segments.Segment(c, c.length, 1) for c in mine]
        try:
            got = lean.forward(x, steps, None)
        except Unavailable:
            return False
        for c in mine:
            c.commit(1)
        if not torch.equal(want, got):
            return False
    return all(_same_cache(a, b, len(span.blocks)) for a, b in zip(generic, mine, strict=True))


@torch.inference_mode()
def rows_same_bits(span: Any, lean: Any) -> bool:
    """Prefill chunks as rows — a fresh 2-token prompt and 2 tokens continuing a cached prefix, in one call — against
    the same tokens one row per call: every output and every cached key and value the same bits. (Four rows: fewer
    than the tile unit's five, so both ways take the same kernel path; swarm_kernels/cpu_amx.h.)"""
    g = torch.Generator().manual_seed(4321)
    prefix = torch.randn(1, 2, span.hidden_size, generator=g)
    chunks = [torch.randn(1, 2, span.hidden_size, generator=g) for _ in range(2)]
    together, alone = [span.new_cache(16) for _ in chunks], [span.new_cache(16) for _ in chunks]
    for cache in (together[1], alone[1]):
        for t in range(prefix.shape[1]):
            lean.forward(prefix[:, t : t + 1], [segments.Segment(cache, cache.length, 1)], None)
            cache.commit(1)
    steps = [segments.Segment(c, c.length, x.shape[1]) for c, x in zip(together, chunks, strict=True)]
    got = lean.forward(torch.cat(chunks, dim=1), steps, None)
    for step in steps:
        step.cache.commit(step.tokens)
    want = []
    for cache, x in zip(alone, chunks, strict=True):
        for t in range(x.shape[1]):
            want.append(lean.forward(x[:, t : t + 1], [segments.Segment(cache, cache.length, 1)], None))
            cache.commit(1)
    if not torch.equal(got, torch.cat(want, dim=1)):
        return False
    return all(_same_cache(a, b, len(span.blocks)) for a, b in zip(together, alone, strict=True))


def _same_cache(a: Any, b: Any, layers: int) -> bool:
    for layer in range(layers):
        ka, va = a.reserve(torch.empty(0), torch.empty(0), layer, a.length)
        kb, vb = b.reserve(torch.empty(0), torch.empty(0), layer, b.length)
        if not (torch.equal(ka[:, :, : a.length], kb[:, :, : b.length])
                and torch.equal(va[:, :, : a.length], vb[:, :, : b.length])):
            return False
    return True
