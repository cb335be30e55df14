"""Affine groups of 32 keep a checkpoint's own blocks: weights dequantized from GGUF block types lie on a grid, and
the quantizer takes that grid's step (swarm_kernels/reference.py `_grid_step`), so re-quantizing them loses nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from swarm_kernels import reference


def gguf_roundtrip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    kind = GGMLQuantizationType[qtype]
    return torch.from_numpy(np.ascontiguousarray(dequantize(quantize(weight.numpy(), kind), kind)))


@pytest.fixture
def weight():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.05
    w[:, :32] *= 0.01  # a group far smaller than the rest
    return w


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1"])
def test_int8_affine_holds_every_gguf_block_of_32_exactly(weight, qtype):
    blocks = gguf_roundtrip(weight, qtype)
    q, scale, minimum = reference.quantize_int8_affine(blocks)
    back = reference.dequantize_int8_affine(q, scale, minimum)
    # float rounding of q * step + min only: a few ulps of the largest weight, not a fraction of a step
    assert (back - blocks).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * blocks.abs().max().item()


@pytest.mark.parametrize("used", [15, 11, 6])
def test_int4_holds_4_bit_blocks_exactly_even_when_a_block_leaves_levels_unused(used):
    """Blocks as Q4_1 stores them (d and m in float16, codes 0..15), each using only codes 0..`used`: the grid's
    step is d, not (max - min) / 15."""
    torch.manual_seed(1)
    d = (torch.rand(64, 8, 1) * 0.01 + 1e-4).half().float()
    m = (torch.randn(64, 8, 1) * 0.05).half().float()
    codes = torch.randint(0, used + 1, (64, 8, 32)).float()
    codes[..., 0], codes[..., 1] = 0, used
    blocks = (codes * d + m).reshape(64, 256)
    packed, scale, minimum = reference.quantize_int4(blocks)
    back = reference.dequantize_int4(packed, scale, minimum, tuple(blocks.shape))
    assert (back - blocks).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * blocks.abs().max().item()


def test_float_weights_take_the_full_range_as_before(weight):
    groups = weight.reshape(64, -1, 32)
    minimum, maximum = groups.amin(-1), groups.amax(-1)
    assert (reference._grid_step(groups, minimum, maximum, 255) == 0).all()  # random floats: no grid
    _, scale, _ = reference.quantize_int8_affine(weight)
    torch.testing.assert_close(scale, (maximum - minimum) / 255, rtol=0, atol=0)


def test_a_grid_with_more_levels_than_codes_is_not_taken(weight):
    blocks = gguf_roundtrip(weight, "Q8_0")  # up to 255 steps: fits int8, not int4
    groups = blocks.reshape(64, -1, 32)
    step = reference._grid_step(groups, groups.amin(-1), groups.amax(-1), 15)
    assert (step == 0).float().mean() > 0.9
