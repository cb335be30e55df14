"""An nf4 matrix-vector product in Triton for decode steps (one token per row of x), on CUDA.

Same weight layout as reference.quantize_nf4 and bitsandbytes (two 4-bit code indices per byte, first in the high
nibble, one absmax per block of 64 consecutive weights of the row-major [N, K] matrix). Each program computes
BLOCK_N outputs: it streams its rows' packed bytes once, looks the 16 code points up, scales them by their block's
absmax and accumulates the dot product with x in float32. Needs K % BLOCK_K == 0 (BLOCK_K a multiple of 64).

Used by quant.py for nf4 on CUDA when x has one row per call and the shapes fit, where it measured faster than
bitsandbytes' own 4-bit inference kernel (benchmarks/kernels.py --device cuda, scripts/gpu_check.sh); anything else
goes to bitsandbytes. Importable without a GPU (TRITON_INTERPRET=1 runs it on CPU tensors, slowly, for tests).
"""

from __future__ import annotations

import importlib.util

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
BLOCK_N = 16
BLOCK_K = 256

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nf4_gemv(x_ptr, w_ptr, absmax_ptr, code_ptr, out_ptr, N, K,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        row_block = tl.program_id(0)
        m = tl.program_id(1)  # row of x
        rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        half = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        x_row = x_ptr + m * K
        for k0 in range(0, K, BLOCK_K):
            element = rows[:, None].to(tl.int64) * K + k0 + 2 * half[None, :]  # index of the high-nibble weight
            packed = tl.load(w_ptr + element // 2, mask=row_ok[:, None], other=0).to(tl.int32)
            high = tl.load(code_ptr + (packed >> 4))
            low = tl.load(code_ptr + (packed & 15))
            scale = tl.load(absmax_ptr + element // 64, mask=row_ok[:, None], other=0.0)
            x_even = tl.load(x_row + k0 + 2 * half).to(tl.float32)
            x_odd = tl.load(x_row + k0 + 2 * half + 1).to(tl.float32)
            acc += tl.sum((high * x_even[None, :] + low * x_odd[None, :]) * scale, axis=1)
        tl.store(out_ptr + m * N + rows, acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def fits(in_features: int) -> bool:
    return HAVE_TRITON and in_features % BLOCK_K == 0


def nf4_gemv(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
             out_features: int) -> torch.Tensor:
    """x [M, K] (M small: one program column per row) → [M, N] in x's dtype."""
    if not fits(x.shape[-1]):
        raise ValueError(f"nf4_gemv needs triton and in_features % {BLOCK_K} == 0, got {x.shape[-1]}")
    x = x.contiguous()
    rows, k = x.shape
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, BLOCK_N), rows)
    _nf4_gemv[grid](x, packed.reshape(-1), absmax.float().contiguous(), code.float().contiguous(), out,
                    out_features, k, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out
