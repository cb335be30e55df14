"""tolerance.py: the parity bound holds for float32 sums in any order, and deliberately wrong kernels fail it.

A bound loose enough to pass every CPU must still catch what goes wrong in a kernel: a transposed group, a code off by
one step, a weight row or a scale off by 1%, a group's minimum dropped. Each wrong variant below runs through the
real kernel (every native build this CPU runs, and oneDNN) and must exceed the bound that the right one stays within.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swarm_kernels import cpu, packed, reference, tolerance
from tests.unit.test_kernels import affine_weight, exact_linear, weights

SHAPE = (97, 192)  # N, K: K a multiple of the native kernel's groups of 32


def test_gamma_and_compose():
    assert tolerance.gamma(1) == pytest.approx(2.0**-24) and tolerance.gamma(3, 0.25) == 3.0
    with pytest.raises(ValueError, match="unbounded"):
        tolerance.gamma(2**24)
    assert tolerance.compose(0.5, 1.0) == 2.0 and tolerance.compose() == 0.0


@pytest.mark.parametrize("k", [1, 7, 576, 4096])
def test_float32_sums_stay_within_the_bound_in_any_order_and_the_native_orders_within_their_lanes_bound(k):
    g = torch.Generator().manual_seed(k)
    x, w = torch.randn(8, k, generator=g), torch.randn(16, k, generator=g)
    exact = x.double() @ w.double().T
    any_order = tolerance.parity_bound(x, w, None, exact, tolerance.Rounding())
    products = x[:, None, :] * w[None, :, :]  # [8, 16, K] float32: rounded once each
    for order in (products, products.flip(-1), products[..., torch.randperm(k, generator=g)]):
        summed = torch.zeros(8, 16)
        for i in range(k):  # one float32 rounding per addition, left to right
            summed = summed + order[..., i]
        assert tolerance.excess(summed, exact, any_order)[0] == 0
    assert tolerance.excess(x @ w.T, exact, any_order)[0] == 0  # MKL's order
    for width in (32, 8):  # cpu_affine.c's orders: `width` lanes of k / width products each, then pairwise
        if k % width:
            continue
        lanes = products.reshape(8, 16, k // width, width)
        acc = torch.zeros(8, 16, width)
        for i in range(k // width):
            acc = acc + lanes[:, :, i]
        while acc.shape[-1] > 1:
            acc = acc[..., : acc.shape[-1] // 2] + acc[..., acc.shape[-1] // 2 :]
        bound = tolerance.parity_bound(x, w, None, exact, tolerance.Rounding(lanes=width))
        assert tolerance.excess(acc[..., 0], exact, bound)[0] == 0
        assert (bound < any_order).all()


def _fma(a, b, c):
    """float32 fma(a, b, c): a * b exact in float64, the sum rounded once more than a true fma (rarely a bit apart)."""
    return (a.double() * b.double() + c.double()).float()


@pytest.mark.parametrize("k", [32, 576, 1536])
def test_sums_split_per_group_stay_within_their_bound(k):
    # cpu_amx.h's arithmetic, emulated: x in three bfloat16 parts, per group the 96 exact products q * x_part summed in
    # float32 in some order, then acc = fma(S_g, s, acc); acc = fma(X_g, m, acc), group after group
    g = torch.Generator().manual_seed(k)
    x = torch.randn(4, k, generator=g) * torch.logspace(-3, 3, k)[torch.randperm(k, generator=g)]
    q = torch.randint(0, 16, (8, k), generator=g).float()
    groups = k // 32
    scale, minimum = torch.rand(8, groups, generator=g) * 0.1, -torch.rand(8, groups, generator=g)
    hi = x.bfloat16().float()
    mid = (x - hi).bfloat16().float()
    lo = (x - hi - mid).bfloat16().float()
    assert torch.equal(hi + mid + lo, x)  # three parts hold a float32 exactly
    weight = (q.double().reshape(8, groups, 32) * scale.double()[..., None] + minimum.double()[..., None]).reshape(8, k)
    terms = (q.double().reshape(8, groups, 32) * scale.double()[..., None]).abs() + minimum.double().abs()[..., None]
    exact = x.double() @ weight.T
    bound = tolerance.parity_bound(x, weight, None, exact, tolerance.Rounding(split=3), terms=terms.reshape(8, k))
    acc = torch.zeros(4, 8)
    for group in range(groups):
        cols = slice(32 * group, 32 * group + 32)
        products = torch.cat([part[:, None, cols] * q[None, :, cols] for part in (lo, mid, hi)], dim=-1)  # exact
        total = torch.zeros(4, 8)
        for i in torch.randperm(96, generator=g):
            total = total + products[..., i]
        sums = torch.zeros(4)
        for i in range(32):
            sums = sums + x[:, 32 * group + i]
        acc = _fma(total, scale[None, :, group], acc)
        acc = _fma(sums[:, None], minimum[None, :, group], acc)
    assert tolerance.excess(acc, exact, bound)[0] == 0
    wrong = acc.clone()
    wrong[0, 0] = _fma(torch.tensor(1.0 + 2.0**-10), acc[0, 0], torch.tensor(0.0))  # one output ~1e-3 off
    assert tolerance.excess(wrong, exact, bound)[0] == 1


def _codes(method, w):
    """(codes 0..15 or 0..255 [N, K], scale, minimum) as reference.py quantizes for the native kernel."""
    if method == "int8":
        return reference.quantize_int8_affine(w)
    packed_, scale, minimum = reference.quantize_int4(w)
    return torch.stack([packed_ >> 4, packed_ & 0x0F], dim=1).reshape(w.shape), scale, minimum


def _kernel_codes(method, q):
    if method == "int8":
        return q.contiguous()
    flat = ((q[:, 0::2] << 4) | q[:, 1::2]).reshape(-1)  # reference.py's bytes, then the kernel's layout
    return cpu.repack_int4(flat, *q.shape)


def _transposed_group(q, scale, minimum):
    q = q.clone()
    q[5, :32] = torch.cat([q[5, 16:32], q[5, :16]])  # one group's halves swapped (a nibble-layout bug)
    return q, scale, minimum


def _code_off_by_one(q, scale, minimum):
    q = q.clone()
    q[5, 32:64] = (q[5, 32:64] + 1).clamp(max=q.max())  # one group a step too high (a rounding bug)
    return q, scale, minimum


def _scale_off(q, scale, minimum):
    scale = scale.clone()
    scale[5] *= 1.01
    return q, scale, minimum


def _minimum_dropped(q, scale, minimum):
    minimum = minimum.clone()
    minimum[5, 1] = 0
    return q, scale, minimum


MUTATIONS = [_transposed_group, _code_off_by_one, _scale_off, _minimum_dropped]


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda f: f.__name__.strip("_"))
def test_a_wrong_native_kernel_fails_the_bound_that_the_right_one_meets(native_build, method, mutation):
    w = weights(SHAPE)
    x = torch.randn(5, SHAPE[1], generator=torch.Generator().manual_seed(4))
    bias = torch.randn(SHAPE[0], generator=torch.Generator().manual_seed(5))
    q, scale, minimum = _codes(method, w)
    weight, terms = affine_weight(q, scale, minimum)
    exact = exact_linear(x, weight, bias)
    path = tolerance.kernel_rounding("native", method, torch.float32, rows=len(x))  # 5 rows: cpu_amx.h's where built
    bound = tolerance.parity_bound(x, weight, bias, exact, path, terms=terms)
    bits = 8 if method == "int8" else 4
    right = cpu.affine_linear(x, _kernel_codes(method, q), bits, scale, minimum, bias, library=native_build)
    assert tolerance.excess(right, exact, bound)[0] == 0
    q, scale, minimum = mutation(q, scale, minimum)
    wrong = cpu.affine_linear(x, _kernel_codes(method, q), bits, scale, minimum, bias, library=native_build)
    over, _ = tolerance.excess(wrong, exact, bound)
    assert over > 0, f"{mutation.__name__} went unnoticed"


needs_onednn = pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape", [(97, 192), (1536, 576), (576, 1536)])
def test_a_wrong_packed_weight_fails_the_bound_that_the_right_one_meets(shape):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0])
    x = torch.randn(5, shape[1])
    exact = exact_linear(x, linear.weight, linear.bias)
    bound = tolerance.parity_bound(x, linear.weight, linear.bias, exact, tolerance.Rounding())
    assert tolerance.excess(packed.PackedLinear(linear)(x), exact, bound)[0] == 0
    for wrong in (lambda w: w[5].mul_(1.01), lambda w: w[5, :32].copy_(w[5, :32].flip(0))):  # a row 1% off; reversed
        bad = nn.Linear(shape[1], shape[0])
        bad.load_state_dict(linear.state_dict())
        with torch.no_grad():
            wrong(bad.weight)
        assert tolerance.excess(packed.PackedLinear(bad)(x), exact, bound)[0] > 0
