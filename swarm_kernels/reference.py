"""Weight-only quantization in plain, readable torch: the specification every fast path is tested against.

The formats, each for a linear layer's weight `W [out_features, in_features]`:

- **int8**: symmetric, one scale per output row. `scale[n] = max_k |W[n, k]| / 127`, `q = round(W / scale)` clipped
  to [-127, 127]. `W ≈ q * scale[:, None]`. Worst-case error per weight: scale / 2.
- **int4**: asymmetric, groups of `groupsize` (32) consecutive weights of a row, each with its own scale and minimum:
  `scale = (max - min) / 15`, `q = round((W - min) / scale)` in [0, 15], `W ≈ q * scale + min`. Packed like nf4.
  Groups of 32 with a scale and a minimum are exactly GGUF's Q4_1 blocks, so a Q4_1 checkpoint (the default model)
  is re-expressed without loss, up to float rounding of the scales. Where a group's values already lie on a grid
  of at most 15 steps (a block dequantized from a checkpoint), its scale is that grid's step instead
  (`_grid_step`), so a block that did not use its whole range is kept exactly too.
- **int8 affine**: the same with 8-bit codes (`/ 255`, [0, 255], one byte each): the native CPU kernel's int8. With
  the grid step it holds every GGUF block type of 32 with at most 256 levels exactly: Q4_0/Q4_1, Q5_0/Q5_1, Q8_0
  and the sub-blocks of Q4_K/Q5_K; not Q6_K, whose 16-value sub-blocks have two scales in a group of 32.
- **nf4**: the 4-bit NormalFloat code of QLoRA (Dettmers et al. 2023), the format bitsandbytes calls `nf4`. The
  weight, flattened row-major, is cut into blocks of `blocksize` values; each block keeps its absolute maximum and
  each value the index of the nearest of 16 code points in [-1, 1] after division by that maximum. Two indices share
  a byte, the first in the high nibble (bitsandbytes' layout, so its packed bytes and ours can be compared).

The quantized linear is `y = x @ dequantize(W).T + bias`, computed in float32 here. The fast paths in
`swarm_kernels.quant` compute the same thing in other ways (bf16 activations, fused kernels) within the tolerances that
tests/unit/test_kernels.py states.
"""

from __future__ import annotations

import torch

INT8_MAX = 127
UINT8_MAX = 255

# The 16 NF4 code points: quantiles of N(0, 1) scaled to [-1, 1], with an exact zero (QLoRA, appendix E; these are the
# values bitsandbytes ships).
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NF4_BLOCKSIZE = 64
INT4_GROUPSIZE = 32
INT8_GROUPSIZE = 32


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] → (q int8 [N, K], scale float32 [N])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.float()
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero with any scale
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] → [..., N] in float32."""
    y = x.float() @ dequantize_int8(q, scale).T
    return y + bias.float() if bias is not None else y


def _quantize_affine(weight: torch.Tensor, groupsize: int, top: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] → (codes 0..top as floats [N, K/g, g], scale float32 [N, K/g], minimum [N, K/g])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if groupsize % 2 or cols % groupsize:
        raise ValueError(f"in_features {cols} does not split into groups of {groupsize}")
    groups = weight.float().reshape(rows, cols // groupsize, groupsize)
    minimum, maximum = groups.amin(dim=-1), groups.amax(dim=-1)
    step = _grid_step(groups, minimum, maximum, top)
    scale = torch.where(step > 0, step, (maximum - minimum) / top)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is all minimum
    q = torch.round((groups - minimum[..., None]) / scale[..., None]).clamp_(0, top)
    return q, scale, minimum


GRID_DIVISORS = (1, 2, 3, 4)
GRID_TOLERANCE = 1e-3  # of a step: dequantized checkpoint values sit within ~1e-5 steps of their grid


def _grid_step(groups: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, top: int) -> torch.Tensor:
    """Per group [N, G]: the step of an affine grid of at most `top` steps from the group's minimum that holds every
    value of the group, or 0 where there is none. Weights dequantized from a checkpoint's own blocks of 32 (GGUF
    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, and Q4_K/Q5_K's sub-blocks of 32) lie on such a grid, with fewer levels than the format
    has codes when the block did not use its whole range; taking the grid's own step (not (max - min) / top) keeps
    them exactly. The step is the smallest gap between distinct values or a small fraction of it (a level the block
    never used doubles a gap). Float weights (random, or trained in float) have no such grid: their step is 0 and
    they take (max - min) / top as before."""
    found = torch.zeros_like(minimum)
    for start in range(0, groups.shape[0], GRID_ROWS):  # a few rows at a time: the temporaries stay small
        rows = slice(start, start + GRID_ROWS)
        found[rows] = _grid_step_rows(groups[rows], minimum[rows], maximum[rows], top)
    return found


GRID_ROWS = 256


def _grid_step_rows(groups: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, top: int) -> torch.Tensor:
    span = maximum - minimum
    gaps = groups.sort(dim=-1).values.diff(dim=-1)
    gaps = torch.where(gaps > span[..., None] * 1e-6, gaps, torch.full_like(gaps, float("inf")))
    smallest = gaps.amin(dim=-1)
    del gaps
    found = torch.zeros_like(span)
    levels = span / smallest  # steps of the grid whose step is the smallest gap (inf or nan: no grid)
    for divisor in GRID_DIVISORS:
        # only groups whose grid would have at most `top` steps are checked value by value: float weights, whose
        # smallest gap is a sliver of their range, are ruled out here without touching their values again
        candidates = ((found == 0) & torch.isfinite(levels) & (levels * divisor <= top + 0.5)).nonzero(as_tuple=True)
        if not candidates[0].numel():
            continue
        step = smallest[candidates] / divisor
        codes = (groups[candidates] - minimum[candidates][:, None]) / step[:, None]
        steps = span[candidates] / step
        fits = ((codes - codes.round()).abs() <= GRID_TOLERANCE).all(dim=-1) & (
            (steps - steps.round()).abs() <= GRID_TOLERANCE)
        found[candidates] = torch.where(fits, step, found[candidates])
    return found


def _dequantize_affine(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                       shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    groups = q.float().reshape(rows, scale.shape[1], cols // scale.shape[1])
    return (groups * scale.float()[..., None] + minimum.float()[..., None]).reshape(shape)


def quantize_int8_affine(weight: torch.Tensor, groupsize: int = INT8_GROUPSIZE
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] (K divisible by groupsize) → (q uint8 [N, K], scale float32 [N, K/g], minimum [N, K/g])."""
    q, scale, minimum = _quantize_affine(weight, groupsize, UINT8_MAX)
    return q.to(torch.uint8).reshape(weight.shape), scale, minimum


def dequantize_int8_affine(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    return _dequantize_affine(q, scale, minimum, (q.shape[0], q.shape[1]))


def int8_affine_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_int8_affine(q, scale, minimum).T
    return y + bias.float() if bias is not None else y


def _pack_nibbles(index: torch.Tensor) -> torch.Tensor:
    flat = index.reshape(-1).to(torch.uint8)
    return (flat[0::2] << 4) | flat[1::2]


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)


def quantize_int4(weight: torch.Tensor, groupsize: int = INT4_GROUPSIZE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] (K divisible by groupsize) → (packed uint8 [N*K/2], scale float32 [N, K/g], minimum [N, K/g])."""
    q, scale, minimum = _quantize_affine(weight, groupsize, 15)
    return _pack_nibbles(q), scale, minimum


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                    shape: tuple[int, int]) -> torch.Tensor:
    return _dequantize_affine(_unpack_nibbles(packed), scale, minimum, shape)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                shape: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_int4(packed, scale, minimum, shape).T
    return y + bias.float() if bias is not None else y


def quantize_nf4(weight: torch.Tensor, blocksize: int = NF4_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (N*K divisible by blocksize, blocksize even) → (packed uint8 [N*K/2], absmax float32 [blocks])."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if blocksize % 2 or weight.numel() % blocksize:
        raise ValueError(f"{weight.numel()} weights do not split into blocks of {blocksize}")
    blocks = weight.float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    # the nearest code point: the bucket between the midpoints of consecutive (sorted) code points
    code = NF4_CODE.to(weight.device)
    index = torch.bucketize(normed.reshape(-1), (code[1:] + code[:-1]) / 2)
    return _pack_nibbles(index), absmax


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
                   blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    index = _unpack_nibbles(packed).long()
    values = NF4_CODE.to(packed.device)[index].reshape(-1, blocksize) * absmax.float()[:, None]
    return values.reshape(shape)


def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int],
               bias: torch.Tensor | None = None, blocksize: int = NF4_BLOCKSIZE) -> torch.Tensor:
    y = x.float() @ dequantize_nf4(packed, absmax, shape, blocksize).T
    return y + bias.float() if bias is not None else y
