"""Unquantized float32 linear layers on the CPU with oneDNN's prepacked weights.

torch's nn.Linear on the CPU runs MKL's sgemm on the row-major weight. For the few rows a decoder step has (one per
session in a batch), oneDNN with the weight reordered once into its own blocked layout is much faster, and no
slower for one row; measured on a 2-core EPYC (AVX-512), ms per call, MKL → oneDNN packed (the full table is
benchmarks/results/kernels.json as of commit 4849564; the file now holds a 2-core AVX2 EPYC's):

    weight (out x in)   1 row          8 rows         16 rows
    1536 x 576          0.34 → 0.28    0.50 → 0.28    0.65 → 0.41
    576 x 1536          0.24 → 0.31    0.42 → 0.29    0.56 → 0.37
    576 x 576           0.13 → 0.12    0.19 → 0.13    0.24 → 0.16
    49152 x 576 (head)  11.0 → 9.7     21.7 → 8.5     28.3 → 13.8

A row's result is also the same bits whatever the number of rows computed with it (tests/unit/test_kernels.py),
which MKL does not promise: a session gets the same output alone or batched with others. That holds for oneDNN's
AVX2 and AVX-512 kernels; its SSE4.1 ones (CPUs without AVX2) order a row's sums by the batch, within float rounding.

`PackedLinear` replaces an nn.Linear (the weight is reordered and the plain copy dropped, so memory stays the same);
`pack_linears(module)` replaces every nn.Linear in a module. Used for unquantized float32 spans and the client's LM
head on the CPU when this torch has oneDNN (`available()`); SWARM_PACKED=0 turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import TypeGuard

import torch
from torch import nn


@functools.cache
def available() -> bool:
    """Whether this torch can reorder and run oneDNN linear weights, checked against nn.Linear on a small case."""
    if os.environ.get("SWARM_PACKED", "1") == "0":
        return False
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        generator = torch.Generator().manual_seed(0)
        weight, bias = torch.randn(48, 64, generator=generator), torch.randn(48, generator=generator)
        x = torch.randn(3, 64, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        return bool(torch.allclose(out, torch.nn.functional.linear(x, weight, bias), atol=1e-4, rtol=1e-5))
    except (RuntimeError, AttributeError, TypeError):
        return False


def fits(linear: nn.Module) -> TypeGuard[nn.Linear]:
    """An unquantized float32 nn.Linear on the CPU."""
    return (type(linear) is nn.Linear and linear.weight.device.type == "cpu"
            and linear.weight.dtype == torch.float32)


class PackedLinear(nn.Module):
    """A drop-in for a float32 CPU nn.Linear, computed by oneDNN with a prepacked weight."""

    kernel = "onednn"

    def __init__(self, linear: nn.Linear):
        super().__init__()
        if not fits(linear):
            raise ValueError(f"PackedLinear takes a float32 nn.Linear on the CPU, got {type(linear).__name__} "
                             f"{linear.weight.dtype} on {linear.weight.device}")
        weight = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # oneDNN's opaque tensor: no storage torch can see, so it is neither a parameter nor a buffer
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.packed_bytes = weight.nbytes
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise TypeError(f"PackedLinear computes float32 on the CPU, got {x.dtype} on {x.device}")
        shape = x.shape
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self._packed, self.bias, "none",
                                                 [], "")
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> int:
    """Replace every float32 CPU nn.Linear inside `module` by a PackedLinear, in place; returns how many."""
    count = 0
    for name, child in list(module.named_children()):
        if fits(child):
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count


def packed_bytes(module: nn.Module) -> int:
    """Bytes of the packed weights inside `module` (torch's parameter and buffer counts do not see them)."""
    return sum(m.packed_bytes for m in module.modules() if isinstance(m, PackedLinear))
