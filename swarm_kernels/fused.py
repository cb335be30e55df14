"""A decode layer in two native calls (swarm_kernels/cpu_attention.c), for the lean decode path.

    first = LayerFirst(AttentionBlock(qkv, o, heads, kv_heads, dim, scaling), gate_up, (factor, eps), (factor, eps),
                       lanes)                                            # once per layer: addresses, geometry
    first(rows, x, mid, gate_up, cos, sin, window, work, scratch)      # mid = x + attention(norm(x));
                                                                        # gate_up = norm(mid) W
    down = ResidualLinear(weight)
    down(inner, mid, out, work, scratch)                               # out = mid + inner W (inner = act(gate) * up)

`swarm.model.lean` computed a layer as ~25 torch, ctypes and Python calls around its native ones (the projections'
kernel, the rotary embedding, the cache appends, the rows' attention): ~40% of a one-row step of SmolLM2's 30 blocks.
`layer_first` makes the same native calls in the same order on the same buffers from C, so a row's result is the
same bits; the RMS norms there are native too, summed as torch sums (`rms_norm`, `norm_lanes`: the vector width at
which they give a norm module's bits, found by running it; where none does, `AttentionBlock` alone is fused and the
norms stay torch's). What stays in Python per layer is the MLP's activation times up (torch's arithmetic). The
projections are cpu.Weight (float32 activations, cpu_affine.c) or cpu_a8.Weight (int8 activations, cpu_a8.c): the
same calls each makes from Python.

Each call checks what the C code trusts (the DecodeRows checked for the layer, every buffer's size, dtype, layout and
device) and returns False where it does not apply, before writing anything; the lean path then takes its calls one by
one. A refusal inside the C code (an attention it cannot compute) also returns False, after the rows' keys and
values went into their caches: the step-by-step path writes the same values there again.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

import torch

from swarm_kernels import attention, cpu, cpu_a8

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p

Linear = cpu.Weight | cpu_a8.Weight  # a projection's weight: float32 activations, or int8 ones (swarm_kernels.cpu_a8)


class _Weight(ctypes.Structure):
    _fields_ = [("codes", _ptr), ("scale", _ptr), ("minimum", _ptr), ("bias", _ptr), ("n", _i64), ("k", _i64),
                ("bits", ctypes.c_int), ("kind", ctypes.c_int)]


class _Attention(ctypes.Structure):
    _fields_ = [("qkv", _Weight), ("o", _Weight), ("heads", _i64), ("kv_heads", _i64), ("dim", _i64),
                ("scaling", ctypes.c_float)]


class _Layer(ctypes.Structure):
    _fields_ = [("attention", _Attention), ("gate_up", _Weight), ("input_norm", _ptr), ("mlp_norm", _ptr),
                ("input_eps", ctypes.c_float), ("mlp_eps", ctypes.c_float), ("lanes", _i64)]


@functools.cache
def _libraries() -> tuple[ctypes.CDLL, ctypes.CDLL] | None:
    """The attention library with its fused calls declared, and the affine kernel's library it was handed (bound
    once: the scratch sizes below are that build's); None where either is unavailable."""
    library, affine = attention._library(), cpu._library()
    if library is None or affine is None:
        return None
    library.attention_set_affine.restype, library.attention_set_affine.argtypes = None, [_ptr]
    library.attention_set_affine(ctypes.cast(affine.affine_linear_parallel, _ptr).value)
    library.attention_block.restype = ctypes.c_int
    library.attention_block.argtypes = [ctypes.POINTER(_Attention), _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                        _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int, ctypes.c_int]
    library.linear_residual.restype = ctypes.c_int
    library.linear_residual.argtypes = [ctypes.POINTER(_Weight), _i64, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int]
    library.layer_first.restype = ctypes.c_int
    library.layer_first.argtypes = [ctypes.POINTER(_Layer), _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr,
                                    _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int, ctypes.c_int]
    library.rms_norm.restype = ctypes.c_int
    library.rms_norm.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_float, _i64, _ptr]
    library.attention_set_a8.restype, library.attention_set_a8.argtypes = None, [_ptr, _i64]
    return library, affine


@functools.cache
def _bind_a8() -> bool:
    """Hand the attention library int8 activations' kernel (cpu_a8.c), once, when a weight of that kind is first
    made (a float32 peer never builds cpu_a8.c for this); without it, weights of kind 1 are refused in C."""
    libraries, a8 = _libraries(), cpu_a8._library()
    if libraries is None or a8 is None:
        return False
    libraries[0].attention_set_a8(ctypes.cast(a8.a8_linear_float, _ptr).value, cpu.MIN_WORK)
    return True


def _library() -> ctypes.CDLL | None:
    libraries = _libraries()
    return None if libraries is None else libraries[0]


def available() -> bool:
    """Whether the fused calls can run here (SWARM_FUSED_DECODE=0: never, to compare)."""
    return os.environ.get("SWARM_FUSED_DECODE", "1") != "0" and _library() is not None


def _weight(weight: Linear) -> _Weight:
    if isinstance(weight, cpu.Weight):
        codes, scale, minimum, bias = weight._addresses
        return _Weight(codes, scale, minimum, bias, weight.n, weight.k, weight.bits, 0)
    _bind_a8()
    return _Weight(weight.codes.data_ptr(), weight.scale.data_ptr(), weight.minimum.data_ptr(),
                   None if weight.bias is None else weight.bias.data_ptr(), weight.n, weight.k, weight.bits, 1)


def _floats(t: torch.Tensor, count: int) -> bool:
    """A contiguous float32 CPU tensor of at least `count` values."""
    return t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() and t.numel() >= count


def scratch_floats(rows: int, *weights: Linear) -> int:
    """The kernels' scratch for calls of `rows` rows with these weights (the largest any of them needs), in the
    builds the fused calls use."""
    libraries = _libraries()
    if libraries is None:
        return 0
    return max(cpu._scratch_floats(libraries[1], w.k) if isinstance(w, cpu.Weight) else _a8_scratch(rows, w.k)
               for w in weights)


@functools.cache
def _a8_scratch(rows: int, k: int) -> int:
    library = cpu_a8._library()
    return 0 if library is None else -(-int(library.a8_scratch_bytes(rows, k)) // 4)


class AttentionBlock:
    """One layer's attention half: out = residual + o(attention), its q | k | v one weight (heads * dim query columns,
    then kv_heads * dim key and value columns) and o another (each a cpu.Weight or a cpu_a8.Weight)."""

    def __init__(self, qkv: Linear, o: Linear, heads: int, kv_heads: int, dim: int, scaling: float):
        if (qkv.n != (heads + 2 * kv_heads) * dim or o.k != heads * dim or o.n != qkv.k or heads % kv_heads
                or dim % 2):
            raise ValueError("the projections do not match the attention's geometry")
        self.weights = (qkv, o)  # held: the C code reads their addresses
        self.hidden, self.heads, self.kv_heads, self.dim = qkv.k, heads, kv_heads, dim
        self._struct = _Attention(_weight(qkv), _weight(o), heads, kv_heads, dim, scaling)
        self._pointer = ctypes.pointer(self._struct)

    def work_floats(self, rows: int) -> int:
        return rows * (self.weights[0].n + 2 * self.heads * self.dim + self.hidden)

    def scratch_floats(self, rows: int) -> int:
        return scratch_floats(rows, *self.weights)

    def __call__(self, rows: attention.DecodeRows, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, window: int | None, work: torch.Tensor,
                 scratch: torch.Tensor) -> bool:
        """x, residual, out [.., rows.count, hidden]; rows checked for this layer (`DecodeRows.check_caches` or
        `check`, its caches holding each row's new token's room); cos and sin T x dim (DecodeRows' rotary angles);
        work and scratch sized by work_floats and scratch_floats. False where it does not apply (see the module's
        doc)."""
        count = rows.count
        arguments = self.arguments(rows, (x, residual, out), cos, sin, window, work, self.work_floats(count),
                                   scratch, self.scratch_floats(count))
        library = _library()
        if arguments is None or library is None:
            return False
        return _done(library.attention_block(self._pointer, count, x.data_ptr(), residual.data_ptr(), out.data_ptr(),
                                             *arguments))

    def arguments(self, rows: attention.DecodeRows, tensors: tuple[torch.Tensor, ...], cos: torch.Tensor,
                  sin: torch.Tensor, window: int | None, work: torch.Tensor, work_floats: int, scratch: torch.Tensor,
                  scratch_floats: int) -> tuple | None:
        """What attention_block and layer_first take after their own tensors (`tensors`: [.., rows.count, hidden]
        each), once checked; None where they do not apply."""
        checked, count = rows._checked, rows.count
        if _library() is None or checked is None or count == 0:
            return None
        _, _, kv_heads, dim, keys, values, key_strides, value_strides, kv16 = checked
        if (kv_heads != self.kv_heads or dim != self.dim or not rows.in_order
                or not all(_floats(t, count * self.hidden) and t.numel() == count * self.hidden for t in tensors)
                or not attention._angles(cos, sin, count, dim) or not _floats(work, work_floats)
                or not _floats(scratch, scratch_floats)):
            return None
        firsts, counts = rows.window(window)
        return (cos.data_ptr(), sin.data_ptr(), rows._rows, keys, values, key_strides, value_strides, rows._positions,
                firsts, counts, work.data_ptr(), scratch.data_ptr(), cpu.threads(), kv16)


def _done(status: int) -> bool:
    if status == -2:
        raise MemoryError("decode attention: no memory for the scores")
    return status == 0


class ResidualLinear:
    """out = residual + x W, for a cpu.Weight or cpu_a8.Weight W."""

    def __init__(self, weight: Linear):
        self.weight = weight
        self._struct = _weight(weight)
        self._pointer = ctypes.pointer(self._struct)

    def work_floats(self, rows: int) -> int:
        return rows * self.weight.n

    def scratch_floats(self, rows: int) -> int:
        return scratch_floats(rows, self.weight)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor, work: torch.Tensor,
                 scratch: torch.Tensor) -> bool:
        """x [.., rows, K], residual and out [.., rows, N]; work ≥ rows * N floats. False, nothing written, where it
        does not apply."""
        library = _library()
        n, k = self.weight.n, self.weight.k
        rows = x.numel() // k if k else 0
        if (library is None or rows == 0 or x.shape[-1] != k or not _floats(x, rows * k)
                or not all(_floats(t, rows * n) and t.numel() == rows * n for t in (residual, out))
                or not _floats(work, self.work_floats(rows)) or not _floats(scratch, self.scratch_floats(rows))):
            return False
        return library.linear_residual(self._pointer, rows, x.data_ptr(), residual.data_ptr(), out.data_ptr(),
                                       work.data_ptr(), scratch.data_ptr(), cpu.threads()) == 0


def rms_norm(x: torch.Tensor, factor: torch.Tensor, eps: float, lanes: int) -> torch.Tensor | None:
    """x [..., n] → factor * (x * rsqrt(mean(x * x) + eps)) as torch computes it with its sums `lanes` wide (see
    cpu_attention.c's torch_row_sum); None where the native code is unavailable or the tensors do not fit it."""
    library = _library()
    n = factor.numel()
    if (library is None or x.shape[-1] != n or not _floats(x, x.numel()) or not _floats(factor, n)
            or factor.dim() != 1 or not 1 <= lanes <= 16):
        return None
    out = torch.empty_like(x)
    return out if library.rms_norm(x.data_ptr(), x.numel() // n, n, factor.data_ptr(), eps, lanes,
                                   out.data_ptr()) == 0 else None


SUM_LANES = (8, 16)  # torch's vector widths for float32 sums on x86 (AVX2 code; AVX-512's)


def norm_lanes(norm: Any, factor: torch.Tensor, eps: float) -> int | None:
    """The vector width with which rms_norm gives the bits of `norm` (a module computing an RMS norm of factor's
    size, weight form already found by the caller), found on random rows of several scales; None when no width
    does (another torch, another machine's code): the fused layer is then not used."""
    n = factor.numel()
    g = torch.Generator().manual_seed(n)
    x = torch.randn(1, 24, n, generator=g) * torch.logspace(-3, 3, 24)[None, :, None]
    with torch.inference_mode():
        expected = norm(x)
        for lanes in SUM_LANES:
            got = rms_norm(x, factor, eps, lanes)
            if got is not None and torch.equal(got, expected):
                return lanes
    return None


class LayerFirst:
    """A Llama-shaped layer up to its MLP's activation: mid = x + attention(norm(x)) and gate | up = norm(mid) W, in
    one call (cpu_attention.c's layer_first); the norms as torch computes them (`norm_lanes` found their sums'
    width)."""

    def __init__(self, attention: AttentionBlock, gate_up: Linear, input_norm: tuple[torch.Tensor, float],
                 mlp_norm: tuple[torch.Tensor, float], lanes: int):
        hidden = attention.hidden
        factors = [factor.float().contiguous() for factor, _ in (input_norm, mlp_norm)]
        if gate_up.k != hidden or any(f.numel() != hidden for f in factors) or not 1 <= lanes <= 16:
            raise ValueError("the norms and the gate | up projection do not match the layer's hidden size")
        self.attention, self.gate_up, self.factors = attention, gate_up, factors  # held: the C code reads them
        self._struct = _Layer(attention._struct, _weight(gate_up), factors[0].data_ptr(), factors[1].data_ptr(),
                              input_norm[1], mlp_norm[1], lanes)
        self._pointer = ctypes.pointer(self._struct)

    def work_floats(self, rows: int) -> int:
        return rows * self.attention.hidden + self.attention.hidden + self.attention.work_floats(rows)

    def scratch_floats(self, rows: int) -> int:
        return scratch_floats(rows, *self.attention.weights, self.gate_up)


    def __call__(self, rows: attention.DecodeRows, x: torch.Tensor, mid: torch.Tensor, gate_up: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, window: int | None, work: torch.Tensor,
                 scratch: torch.Tensor) -> bool:
        """x, mid [.., rows.count, hidden]; gate_up [.., rows.count, gate_up.n]; the rest as AttentionBlock's.
        False where it does not apply (see the module's doc)."""
        count, n = rows.count, self.gate_up.n
        if not (_floats(gate_up, count * n) and gate_up.numel() == count * n):
            return False
        arguments = self.attention.arguments(rows, (x, mid), cos, sin, window, work, self.work_floats(count),
                                             scratch, self.scratch_floats(count))
        library = _library()
        if arguments is None or library is None:
            return False
        return _done(library.layer_first(self._pointer, count, x.data_ptr(), mid.data_ptr(), gate_up.data_ptr(),
                                            *arguments))
