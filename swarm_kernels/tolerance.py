"""How far a linear kernel's output may lie from the exact value, element by element: a bound derived from how the
path rounds, instead of a fixed tolerance that happens to pass on one CPU. tests/unit/test_kernels.py checks every
kernel the machine can run against it (and that deliberately wrong kernels fail it: tests/unit/test_tolerance.py).

The derivation. An output element is y = sum_k x_k w_k + b, with w_k the exact value of the weight's dequantization
formula (q * s + m for affine codes, q * s symmetric, code * absmax nf4, the weight itself unquantized) from the stored
float32 codes, scales and minima. A path computes it with unit roundoff u (2^-24 float32, 2^-8 bfloat16, 2^-11
float16). A sum whose every term goes through at most d roundings on its way into the result (its product, the
additions along its path, the bias) satisfies (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
sections 3.1 and 4.2)

    |fl(y) - y| <= gamma_d * (sum_k |x_k| |w_k| + |b|),     gamma_d = d u / (1 - d u).

With no knowledge of the order, d = K + 1: true for *any* order, blocked or vectorized, with or without fused
multiply-adds, which is why it holds for MKL, oneDNN, AVX-512, AVX2 and portable code alike, and why a fixed
tolerance that passes on one CPU need not pass on another. A kernel whose order we wrote (swarm_kernels/cpu_affine.c: L
partial sums of K / L products each, in increasing k, added pairwise, then the bias) has d = K / L + log2 L + 1
(`Rounding.lanes`): L = 32 on AVX-512 and in the portable loops (d = K / 32 + 6), 8 on AVX2 (d = K / 8 + 4, one
8-lane register per row and output, which leaves the registers for blocking over rows; swarm_kernels.cpu.sum_lanes says
which the build has). The tile unit's path (cpu_amx.h, calls of five rows or more on a CPU with AMX) never forms the
dequantized weight: `Rounding.split` bounds it relative to the terms instead.
What else a path rounds, each a relative error that composes as prod(1 + e) - 1 (`compose`):

- inputs: activations rounded before the products (torch's CPU kernels take bf16: 2^-8 of each |x_k|);
- weights: the dequantization itself, relative to the magnitude of its terms t_k = |q s| + |m| (not |w_k|: w is
  a difference of terms): gamma_2 for q * s + m in float32 (gamma_1 for one product), plus scales or zero points
  stored in bf16 (2^-8);
- quantized inputs: activations put on a grid of (row absmax) / 127, half a step each (LLM.int8);
- output: the result rounded after the sums (a bf16 output; a bias then added in bf16 rounds again).

Put together, with M_w = sum |x| |w| + |b| and M_t = sum |x| t, a path's error before its output rounding is at most
compose(inputs, gamma_d) M_w + weights (1 + inputs)(1 + gamma_d) M_t (+ the input grid's half steps times
sum |w|), and output rounding adds `output` times |y| plus that. `parity_bound` sums the bounds of two paths (by
default the fast one against `EXACT`, the same formula in float64, whose own error is ~1e-16 relative). The bound
is a worst case: correct kernels measure far below it (typically ~sqrt(K) u M_w, not K u M_w), and wrong ones (a
transposed group, a code a step off, a scale or a row 1% off, a minimum dropped) exceed it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from swarm_kernels import cpu
from swarm_kernels.cpu import GROUP

FLOAT64 = 2.0**-53
FLOAT32 = 2.0**-24
BFLOAT16 = 2.0**-8
FLOAT16 = 2.0**-11
UNIT_ROUNDOFF = {torch.float64: FLOAT64, torch.float32: FLOAT32, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}


def gamma(n: int, u: float = FLOAT32) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n successive roundings (n u < 1)."""
    if n * u >= 1:
        raise ValueError(f"gamma_{n} is unbounded at unit roundoff {u:g}")
    return n * u / (1 - n * u)


def compose(*relative: float) -> float:
    """The relative error bound of stages with relative errors `relative`, one after the other: prod(1 + e) - 1."""
    return math.prod(1 + e for e in relative) - 1


@dataclass(frozen=True)
class Rounding:
    """How one path computes y = x @ W.T + b, as far as its rounding goes (module docstring)."""

    inputs: float = 0.0  # |x~ - x| <= inputs |x|, for each activation as the path multiplies it
    weights: float = 0.0  # |w~ - w| <= weights * t, t the magnitude of the weight's dequantization terms
    sums: float = FLOAT32  # unit roundoff of the products and additions
    lanes: int = 1  # partial sums the path splits K into, added pairwise at the end (1: any order, the worst case)
    output: float = 0.0  # relative rounding of the result after the sums
    quantized_inputs: float = 0.0  # |x~ - x| <= quantized_inputs * max |x| of the row, on top of `inputs`
    # > 0: the path never forms the dequantized weight: per group of 32 it sums `split` x 32 exact products q * x_part
    # in any order, then adds s * S_g and m * X_g (X_g = the group's sum of x) to its accumulator, group after group,
    # then the bias (cpu_amx.h, split = 3 bfloat16 parts); its error is relative to the terms, sum |x| (|q s| + |m|)
    # + |b|, times (1 + 2^-7): the parts' magnitudes add up to at most that much of |x|.
    split: int = 0

    def depth(self, k: int) -> int:
        """Roundings on the longest way of one product into the result: its lane's, the pairwise sums', the bias."""
        if self.split:  # the group's sum, its FMA, two FMAs per later group, the bias
            return self.split * GROUP + 1 + 2 * (-(-k // GROUP)) + 1
        return -(-k // self.lanes) + math.ceil(math.log2(self.lanes)) + 1


EXACT = Rounding(weights=gamma(2, FLOAT64), sums=FLOAT64)  # the formula evaluated in float64


def reference_rounding(dequantize_ops: int = 0, output: torch.dtype = torch.float32) -> Rounding:
    """reference.py's path: weights dequantized in float32 (`dequantize_ops` roundings: 2 affine, 1 symmetric or nf4,
    0 unquantized), a float32 matmul and bias in any order, then the output cast to `output`."""
    return Rounding(weights=gamma(dequantize_ops) if dequantize_ops else 0.0,
                    output=0.0 if output == torch.float32 else UNIT_ROUNDOFF[output])


def _error_before_output(path: Rounding, x: torch.Tensor, m_w: torch.Tensor, m_t: torch.Tensor,
                         row_weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sums = gamma(path.depth(x.shape[-1]), path.sums)
    if path.split:  # every product q x and m x rounds on its way, relative to the terms it came from; the bias last
        error = compose(path.inputs, sums) * (1 + 2.0**-7) * (m_t + b)
    else:
        error = compose(path.inputs, sums) * m_w + path.weights * (1 + path.inputs) * (1 + sums) * m_t
    if path.quantized_inputs:  # half a grid step per activation, times sum_k |w~_k|
        grid = path.quantized_inputs * (1 + path.inputs) * x.detach().double().abs().amax(-1, keepdim=True)
        error = error + grid * row_weight * (1 + sums)
    return error


def parity_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, value: torch.Tensor,
                 fast: Rounding, reference: Rounding = EXACT, terms: torch.Tensor | None = None) -> torch.Tensor:
    """The most |fast(x) - reference(x)| may be, per output element ([..., N], float64), when both compute
    x @ weight.T + bias: `weight` [N, K] the exact dequantized weight, `terms` [N, K] the magnitude of the terms each
    weight is dequantized from (default |weight|: unquantized), `value` the reference's output (for |y|)."""
    ax = x.detach().double().abs()
    w = weight.detach().double().abs().to(x.device)
    t = w if terms is None else terms.detach().double().abs().to(x.device)
    b = bias.detach().double().abs() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64,
                                                                           device=x.device)
    m_w, m_t = ax @ w.T + b, ax @ t.T
    y = value.detach().double().abs()

    def error(path: Rounding, y: torch.Tensor) -> torch.Tensor:
        before = _error_before_output(path, x, m_w, m_t, w.sum(-1) + path.weights * t.sum(-1), b)
        return before + path.output * (y + b + before)  # + |b|: a bias added after an output rounding

    u = reference.output
    ref_error = error(reference, y) / (1 - u)  # its output rounding scales with the exact |y| <= |value| + error
    return ref_error + error(fast, y + ref_error)


def excess(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor) -> tuple[int, float]:
    """(how many elements of |got - want| exceed `bound`, the largest ratio |got - want| / bound)."""
    error = (got.detach().double() - want.detach().double()).abs()
    ratio = error / bound.clamp_min(torch.finfo(torch.float64).tiny)
    return int((error > bound).sum()), float(ratio.max()) if ratio.numel() else 0.0


def kernel_rounding(kernel: str, method: str, dtype: torch.dtype, rows: int = 1) -> Rounding:
    """How quant.py's `kernel` computes `method` with `dtype` activations in a call of `rows` input rows (the CPU
    paths, and the reference on any device). What is said here of code that is not ours is an assumption the parity
    tests would refute."""
    out = 0.0 if dtype == torch.float32 else UNIT_ROUNDOFF[dtype]
    if kernel == "reference":  # reference.py in float32, then cast to the activations' dtype
        return reference_rounding(1 if method in ("int8", "nf4") else 2, dtype)
    if kernel == "native" and 0 < cpu.amx() <= rows:  # cpu_amx.h: three bfloat16 parts per x, sums per group
        return Rounding(split=3, output=out)
    if kernel == "native":  # cpu_affine.c: q * s + m (or an FMA), the build's lanes added pairwise, the bias; x float32
        return Rounding(weights=gamma(2), lanes=cpu.sum_lanes(), output=out)
    if kernel == "torch":
        # bf16 activations; codes exact, the scale (int8) or scale and zero point (int4: zero = m + 8 s in float32)
        # in bf16, applied in float32; a bf16 output, then the bias added in the caller's dtype
        return Rounding(inputs=0.0 if dtype == torch.bfloat16 else BFLOAT16,
                        weights=compose(BFLOAT16, gamma(1 if method == "int8" else 3)),
                        output=gamma(2, BFLOAT16) if dtype == torch.bfloat16 else compose(BFLOAT16, FLOAT32))
    if kernel == "bitsandbytes" and method == "int8":
        # LLM.int8's CPU backend: activations cast to fp16, then put on a grid of row absmax / 127 (half a step each;
        # columns with outliers >= 6 stay exact); int8 products summed in float32 (int32 on AVX-512: exact); scaled
        # back by three float32 roundings and a constant, 6.200124e-05, that is 1.8e-5 above 1/127^2; the row absmax
        # of the weight (scale * 127) rounded once
        return Rounding(inputs=FLOAT16, quantized_inputs=(1 / 254 + 2 * FLOAT32) * (1 + FLOAT16),
                        weights=compose(FLOAT32, 2e-5, gamma(3)), output=out)
    if kernel == "bitsandbytes" and method == "nf4":  # dequantized in float32 (code * absmax), then torch's matmul
        return Rounding(weights=gamma(1), output=out)
    raise ValueError(f"no error model for the {kernel} kernel's {method}")
