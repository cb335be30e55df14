"""The native kernel of 4- and 8-bit weights against int8 activations (swarm_kernels/cpu_a8.c), and its torch
reference.

int8 and int4 spans on the CPU compute with float32 activations by default (swarm_kernels/cpu_affine.c). A peer's
`--activations int8` (swarm_kernels.cpu.set_activations) has their projections quantize each input row's activations
per group of 32 to int8 (a scale per group, as llama.cpp's Q8_0) and multiply them with integer dot products: the
same weights, a further rounding of the activations (about 1/254 of a group's largest value), and multiply-adds that
cost a fraction of float32's where a call has many rows (a decode batch, a prefill chunk). The arithmetic is defined
exactly in cpu_a8.c's header: every instruction set and thread count gives the same bits, a row alone or batched.

    weight = Weight(codes, scale, minimum, bias, bits)  # codes: uint8 [N, K], one a byte (0..15 for bits 4)
    y = weight(x)                                       # x [..., K] float32 → [..., N] float32
    y = reference(x, codes, scale, minimum, bias)       # the same arithmetic in torch (float64 products)
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from swarm_kernels import cpu
from swarm_kernels.cpu import FLAGS, GROUP, compile_library

SOURCE = Path(__file__).with_name("cpu_a8.c")
BLOCK = 16


@functools.cache
def _library() -> ctypes.CDLL | None:
    return build(tuple(FLAGS))


def build(flags: tuple[str, ...]) -> ctypes.CDLL | None:
    library = compile_library(SOURCE, flags)
    if library is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.a8_quantize.restype = None
    library.a8_quantize.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    library.a8_repack.restype = None
    library.a8_repack.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_int, ptr, ptr, ptr]
    library.a8_linear.restype = ctypes.c_int
    library.a8_linear.argtypes = [ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, ctypes.c_int,
                                  i64]
    library.a8_linear_float.restype = ctypes.c_int
    library.a8_linear_float.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, ptr, ptr, ptr, ptr, i64, ctypes.c_int, i64,
                                        ptr]
    library.a8_scratch_bytes.restype, library.a8_scratch_bytes.argtypes = i64, [i64, i64]
    library.a8_set_pool.restype, library.a8_set_pool.argtypes = None, [ptr]
    library.a8_path.restype, library.a8_path.argtypes = ctypes.c_char_p, []
    pool = cpu._library()  # blocks shared among the threads of the affine kernel's pool (cpu.set_threads)
    if pool is not None:
        library.a8_set_pool(ctypes.cast(pool.affine_pool_run, ctypes.c_void_p).value)
    return library


def available() -> bool:
    return _library() is not None


def path() -> str:
    """The instruction set the build uses: avx512vnni, avx2 or portable."""
    library = _require()
    return library.a8_path().decode()


def _require() -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("the native CPU kernel is unavailable (no working C compiler)")
    return library


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 → (xq int8 [M, K], sx float32 [M, K/32], t float32 [M, K/32]) as the kernel quantizes."""
    library = _require()
    if x.dim() != 2 or x.shape[1] % GROUP or not x.is_cpu:
        raise ValueError(f"quantize takes a CPU tensor [M, K] with K a multiple of {GROUP}")
    x = x.to(torch.float32).contiguous()
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8)
    sx = torch.empty(m, k // GROUP, dtype=torch.float32)
    t = torch.empty(m, k // GROUP, dtype=torch.float32)
    library.a8_quantize(x.data_ptr(), m, k, xq.data_ptr(), sx.data_ptr(), t.data_ptr())
    return xq, sx, t


def quantize_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize() in torch: the same float32 operations (amax, 127 / amax, x * it rounded half to even; a group of
    zeros, or too small for 127 / amax to be finite, as zeros with sx 0; inf or NaN: sx NaN)."""
    m = x.shape[0]
    groups = x.reshape(m, -1, GROUP)
    amax = groups.abs().amax(dim=-1, keepdim=True)
    inv = torch.tensor(127.0) / amax
    scaled = amax.isfinite() & (amax > 0) & inv.isfinite()
    q = torch.where(scaled, torch.round(groups * torch.where(scaled, inv, 0.0)).clamp(-127, 127), 0.0)
    sx = torch.where(scaled, amax / torch.tensor(127.0), torch.where(amax.isfinite(), 0.0, torch.nan)).squeeze(-1)
    t = sx * q.sum(dim=-1)
    return q.to(torch.int8).reshape(x.shape), sx, t


def reference(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """The kernel's result computed in float64 from the same quantized activations (differs from it only by the
    kernel's float32 roundings of its per-group steps)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    m = flat.shape[0]
    xq, sx, t = quantize_reference(flat)
    d = torch.einsum("mgj,ngj->mng", xq.double().reshape(m, -1, GROUP),
                     codes.double().reshape(codes.shape[0], -1, GROUP))
    y = (d * (scale.double()[None] * sx.double()[:, None, :]) + minimum.double()[None] * t.double()[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.double()
    return y.float().reshape(*x.shape[:-1], codes.shape[0])


class Weight:
    """A 4- or 8-bit weight repacked for the kernel (16-row blocks; cpu_a8.c says how), called with float32 inputs."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                 bias: torch.Tensor | None = None, bits: int = 4):
        library = _require()
        n, k = codes.shape
        tensors = (codes, scale, minimum) if bias is None else (codes, scale, minimum, bias)
        if (codes.dtype != torch.uint8 or k % GROUP or scale.shape != (n, k // GROUP) or bits not in (4, 8)
                or minimum.shape != scale.shape or (bias is not None and bias.numel() != n)
                or not all(t.is_cpu for t in tensors)):
            raise ValueError(f"inconsistent tensors for a {n}x{k} {bits}-bit weight")
        if bits == 4 and int(codes.max()) > 15:
            raise ValueError("4-bit codes must lie in 0..15")
        codes = codes.contiguous()
        scale, minimum = scale.float().contiguous(), minimum.float().contiguous()
        blocks = -(-n // BLOCK)
        self.n, self.k, self.bits = n, k, bits
        self.codes = torch.empty(blocks * BLOCK * k * bits // 8, dtype=torch.uint8)
        self.scale = torch.empty(blocks * (k // GROUP) * BLOCK, dtype=torch.float32)
        self.minimum = torch.empty_like(self.scale)
        library.a8_repack(codes.data_ptr(), scale.data_ptr(), minimum.data_ptr(), n, k, bits, self.codes.data_ptr(),
                          self.scale.data_ptr(), self.minimum.data_ptr())
        self.bias = None if bias is None else bias.float().contiguous()

    def rows(self, start: int, count: int) -> Weight | None:
        """Output rows start .. start + count - 1 as a Weight sharing this one's memory; None unless they start on a
        16-row block and end on one (or at the last row)."""
        if start % BLOCK or (count % BLOCK and start + count != self.n) or not 0 < count <= self.n - start:
            return None
        view = Weight.__new__(Weight)
        groups, first, blocks = self.k // GROUP, start // BLOCK, -(-count // BLOCK)
        view.n, view.k, view.bits = count, self.k, self.bits
        per_block = BLOCK * self.k * self.bits // 8
        view.codes = self.codes[first * per_block : (first + blocks) * per_block]
        view.scale = self.scale[first * groups * BLOCK : (first + blocks) * groups * BLOCK]
        view.minimum = self.minimum[first * groups * BLOCK : (first + blocks) * groups * BLOCK]
        view.bias = None if self.bias is None else self.bias[start : start + count]
        return view

    @classmethod
    def from_kernel_layout(cls, packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                           bias: torch.Tensor | None = None, bits: int = 4) -> Weight:
        """From swarm_kernels.cpu's layout: 8-bit codes [N, K], or 4-bit ones as cpu.repack_int4 packs them."""
        n, groups = scale.shape
        if bits == 8:
            return cls(packed.reshape(n, groups * GROUP), scale, minimum, bias, bits=8)
        return cls(cpu.int4_codes(packed, n, groups * GROUP), scale, minimum, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        library = _require()
        if x.shape[-1] != self.k:
            raise ValueError(f"input has {x.shape[-1]} features, the weight {self.k}")
        flat = x.reshape(-1, self.k)
        if flat.dtype != torch.float32 or not flat.is_contiguous():
            flat = flat.to(torch.float32).contiguous()
        if not flat.is_cpu:
            raise ValueError("the native kernel takes contiguous CPU tensors")
        m = flat.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32)
        scratch = torch.empty(library.a8_scratch_bytes(m, self.k), dtype=torch.uint8)  # the quantized rows
        status = library.a8_linear_float(flat.data_ptr(), m, self.k, self.codes.data_ptr(), self.bits,
                                         self.scale.data_ptr(),
                                         self.minimum.data_ptr(), None if self.bias is None else self.bias.data_ptr(),
                                         y.data_ptr(), self.n, cpu.threads(), cpu.MIN_WORK, scratch.data_ptr())
        if status != 0:
            raise ValueError(f"the native kernel refused a {self.n}x{self.k} weight")
        return y.reshape(*x.shape[:-1], self.n)
