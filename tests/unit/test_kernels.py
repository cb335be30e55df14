"""swarm_kernels/: the reference quantizers' own guarantees, and every fast path's parity with the exact value.

Parity is checked element by element, against the exact value of the quantized layer's formula (float64), within a
bound derived from how the path rounds (swarm_kernels/tolerance.py: gamma_d of sum |x||w| for float32 sums, d = K + 1 in
any order, K / 32 + 6 or K / 8 + 4 in the native kernel's builds, plus what dequantizing, bf16 activations or scales,
LLM.int8's activation grid or a bf16 output add), not a fixed tolerance: it holds for every order of the sums, so on
every CPU.
reference.py itself is held to the same bound. And every path the build can produce runs here where the CPU can run
it: the native kernel compiled for AVX-512, AVX2 and plain x86-64 as well as -march=native (`NATIVE_BUILDS`, in
tests/unit/test_native_kernels.py), and oneDNN, MKL and torch's kernels capped to the instruction sets of other CPUs
(`test_parity_on_the_code_paths_of_other_cpus`). The CUDA-only paths (bitsandbytes and triton on a GPU) keep measured
relative tolerances (`GPU_TOLERANCE`): no GPU has checked a derivation for them."""

from __future__ import annotations

import functools
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from swarm_kernels import cpu, packed, reference, tolerance, triton_nf4
from swarm_kernels.quant import HAVE_BITSANDBYTES, QuantLinear, kernel_for, quantize_linears

# (kernel, activation dtype) → max |fast - reference| / max |reference|, on CUDA only (measured, not derived)
GPU_TOLERANCE = {
    ("bitsandbytes", torch.bfloat16): 4e-2,
    ("bitsandbytes", torch.float16): 3e-2,
    ("triton", torch.bfloat16): 2e-2,
    ("triton", torch.float16): 1e-2,
}

INT8_SHAPES = [(1, 1), (7, 13), (33, 577), (576, 1536), (1536, 576)]
INT8PACK_SHAPES = [(7, 16), (33, 48), (576, 1536), (1536, 576), (1, 4096)]  # in_features % 16 == 0
NF4_SHAPES = [(1, 64), (5, 128), (96, 72), (576, 1536)]  # N*K a multiple of the block size 64
INT4_SHAPES = [(1, 32), (7, 96), (576, 1536), (1536, 576)]  # K a multiple of the group size 32
INT4PACK_SHAPES = [(16, 32), (48, 96), (576, 1536), (1536, 576)]  # and N % 16 == 0 for torch's kernel

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.gpu,
                                       pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")])]


def weights(shape, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0, 0] = 0.4  # an outlier, as real checkpoints have
    return w.to(device, dtype)


@pytest.mark.parametrize("shape", INT8_SHAPES)
def test_int8_reference_error_is_at_most_half_a_step(shape):
    w = weights(shape)
    q, scale = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (shape[0],)
    assert q.abs().max() <= 127 and (q.abs().amax(dim=1) == 127).all()  # each row uses its whole range
    err = (reference.dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("shape", INT4_SHAPES)
def test_int4_reference_error_is_at_most_half_a_step(shape):
    w = weights(shape)
    packed, scale, minimum = reference.quantize_int4(w)
    assert packed.numel() * 2 == w.numel() and scale.shape == (shape[0], shape[1] // 32) == minimum.shape
    err = (reference.dequantize_int4(packed, scale, minimum, shape) - w).abs()
    assert (err <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all()


def test_int4_reexpresses_q4_1_blocks_exactly():
    # GGUF Q4_1: per block of 32, W = d * q + m with q in 0..15 and each block using q = 0 and q = 15
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 16, (8, 4, 32), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    d, m = torch.rand(8, 4, 1, generator=g) * 0.01, torch.randn(8, 4, 1, generator=g) * 0.05
    w = (d * q + m).reshape(8, 128)
    restored = reference.dequantize_int4(*reference.quantize_int4(w), w.shape)
    torch.testing.assert_close(restored, w, atol=1e-7, rtol=1e-6)


def test_int8_reference_keeps_zero_rows_zero():
    w = torch.zeros(3, 8)
    w[1] = torch.linspace(-1, 1, 8)
    q, scale = reference.quantize_int8(w)
    assert torch.isfinite(scale).all() and (q[0] == 0).all() and (q[2] == 0).all()


@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_nf4_reference_picks_the_nearest_code_point(shape):
    w = weights(shape)
    packed, absmax = reference.quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.numel() * 2 == w.numel()
    assert absmax.numel() == w.numel() // reference.NF4_BLOCKSIZE
    restored = reference.dequantize_nf4(packed, absmax, shape)
    normed = (w.reshape(-1, 64) / absmax[:, None]).reshape(-1, 1)
    best = (normed - reference.NF4_CODE).abs().min(dim=1).values
    got = (restored.reshape(-1, 64) / absmax[:, None]).reshape(-1)
    assert torch.allclose((normed[:, 0] - got).abs(), best, atol=1e-6)
    # half the widest gap between code points bounds the error, relative to each block's absmax
    gap = (reference.NF4_CODE[1:] - reference.NF4_CODE[:-1]).max() / 2
    assert ((restored - w).abs().reshape(-1, 64) <= gap * absmax[:, None] + 1e-7).all()


def test_nf4_packs_the_first_value_in_the_high_nibble():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = -1.0, 1.0  # code index 0 and 15
    packed, absmax = reference.quantize_nf4(w)
    assert packed[0].item() == 0x0F and absmax.item() == 1.0


def test_reference_refuses_shapes_it_cannot_quantize():
    with pytest.raises(ValueError, match="2-D"):
        reference.quantize_int8(torch.zeros(4))
    with pytest.raises(ValueError, match="blocks of 64"):
        reference.quantize_nf4(torch.zeros(3, 7))
    with pytest.raises(ValueError, match="groups of 32"):
        reference.quantize_int4(torch.zeros(3, 48))


def _cpu_flags() -> set[str]:
    try:
        return {word for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
                for word in line.split(":", 1)[1].split()}
    except OSError:
        return set()


X86 = platform.machine() in ("x86_64", "AMD64")
AVX512 = "avx512f" in _cpu_flags()
needs_x86 = pytest.mark.skipif(not X86, reason="the x86-64 builds of the native kernel need an x86-64 CPU")


needs_cc = pytest.mark.skipif(not cpu.available(), reason="no working C compiler for swarm_kernels/cpu_affine.c")


@needs_cc
def test_dispatch_picks_the_native_kernel_on_cpu_and_refuses_unknown_methods():
    assert kernel_for("int8", torch.device("cpu")) == "native"
    assert kernel_for("int4", torch.device("cpu")) == "native"
    assert kernel_for("int4", torch.device("cpu"), in_features=48, out_features=32) == "reference"
    assert kernel_for("int8", torch.device("cpu"), in_features=48) == "torch"  # 48 % 32 != 0, 48 % 16 == 0
    assert kernel_for("nf4", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown quantization"):
        kernel_for("int3", torch.device("cpu"))


def exact_weight(method, kernel, w, fast=None):
    """(the exact dequantized weight [N, K] float64, the magnitude of the terms the fast kernel dequantizes it from,
    reference.py's float32 output as a function of (x, bias), the float32 roundings of reference.py's dequantization,
    and the magnitude of reference.py's terms when they differ) for the quantization the fast kernel computes from
    (its own layout aside)."""
    shape = tuple(w.shape)
    if method == "int8" and kernel == "native":
        q, scale, minimum = reference.quantize_int8_affine(w)
        return (*affine_weight(q, scale, minimum),
                lambda x, bias: reference.int8_affine_linear(x, q, scale, minimum, bias), 2)
    if method == "int8":
        q, scale = reference.quantize_int8(w)
        exact = q.double() * scale.double()[:, None]
        return exact, exact.abs(), lambda x, bias: reference.int8_linear(x, q, scale, bias), 1
    if method == "int4":
        packed_, scale, minimum = reference.quantize_int4(w)
        codes = torch.stack([packed_ >> 4, packed_ & 0x0F], dim=1).reshape(shape)
        exact, terms = affine_weight(codes, scale, minimum)
        fast_terms = terms
        if kernel == "torch":  # torch dequantizes (q - 8) * scale + (minimum + 8 * scale): other terms, same weight
            fast_terms = affine_weight(codes.double() - 8, scale, minimum.double() + 8 * scale.double())[1]
        return (exact, fast_terms, lambda x, bias: reference.int4_linear(x, packed_, scale, minimum, shape, bias), 2,
                terms)
    if kernel == "bitsandbytes":  # bitsandbytes' own nf4 bytes (a value halfway between code points may differ)
        packed_, absmax = fast.qweight.reshape(-1), fast.scale
    else:
        packed_, absmax = reference.quantize_nf4(w)
    index = torch.stack([packed_ >> 4, packed_ & 0x0F], dim=1).reshape(-1).long()
    exact = (reference.NF4_CODE.double().to(w.device)[index].reshape(-1, reference.NF4_BLOCKSIZE)
             * absmax.double()[:, None]).reshape(shape)
    return exact, exact.abs(), lambda x, bias: reference.nf4_linear(x, packed_, absmax, shape, bias), 1


def affine_weight(q, scale, minimum):
    """(q * scale + minimum, |q * scale| + |minimum|) in float64 for codes q [N, K] in groups with scale and minimum
    [N, K / group]."""
    expand = functools.partial(torch.repeat_interleave, repeats=q.shape[1] // scale.shape[1], dim=1)
    product, minimum = q.double() * expand(scale.double()), expand(minimum.double())
    return product + minimum, product.abs() + minimum.abs()


def exact_linear(x, weight, bias):
    y = x.double() @ weight.double().T
    return y + bias.double() if bias is not None else y


def assert_within_bound(got, want, bound, what):
    over, worst = tolerance.excess(got, want, bound)
    assert over == 0, f"{what}: {over} of {got.numel()} elements exceed the bound (worst at {worst:.2f}x the bound)"


def _parity(method, kernel, shape, dtype, device, bias=True, rows=(2, 3)):
    w = weights(shape, device=device, dtype=dtype)
    linear = nn.Linear(shape[1], shape[0], bias=bias, device=device, dtype=dtype)
    linear.weight.data.copy_(w)
    fast = QuantLinear(linear, method, kernel)
    x = torch.randn(*rows, shape[1], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = fast(x)
    assert got.shape == (*rows, shape[0]) and got.dtype == dtype
    weight, terms, reference_linear, dequantize_ops, *reference_terms = exact_weight(method, kernel, w, fast)
    exact, want = exact_linear(x, weight, linear.bias), reference_linear(x, linear.bias)
    what = f"{kernel} {method} {shape} {dtype} rows {rows}"
    if device != "cpu" and kernel in ("bitsandbytes", "triton"):
        rel = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert rel <= GPU_TOLERANCE[(kernel, dtype)], f"{what}: relative error {rel:.2e}"
        return
    for name, path, out, path_terms in (
            ("reference.py", tolerance.reference_rounding(dequantize_ops), want, (reference_terms or [terms])[0]),
            (kernel, tolerance.kernel_rounding(kernel, method, dtype, math.prod(rows)), got, terms)):
        bound = tolerance.parity_bound(x, weight, linear.bias, exact, path, terms=path_terms)
        assert_within_bound(out, exact, bound, f"{what}, {name} vs exact")


@pytest.mark.parametrize("shape", INT8PACK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cpu_int8_matches_reference(shape, dtype):
    _parity("int8", "torch", shape, dtype, "cpu")


@pytest.mark.parametrize("shape", INT4PACK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_cpu_int4_matches_reference(shape, dtype):
    _parity("int4", "torch", shape, dtype, "cpu")


def test_odd_widths_fall_back_to_the_reference_instead_of_crashing_torch():
    assert kernel_for("int8", torch.device("cpu"), in_features=577) == "reference"
    layer = QuantLinear(nn.Linear(13, 7), "int8")
    assert layer.kernel == "reference" and layer(torch.randn(2, 13)).shape == (2, 7)
    with pytest.raises(ValueError, match="in_features % 16"):
        QuantLinear(nn.Linear(13, 7), "int8", "torch")
    with pytest.raises(ValueError, match="in_features % 32"):
        QuantLinear(nn.Linear(48, 7), "int8", "native")


def test_int8_affine_reference_error_is_at_most_half_a_step_and_q4_1_is_exact():
    w = weights((33, 96))
    q, scale, minimum = reference.quantize_int8_affine(w)
    assert q.dtype == torch.uint8 and scale.shape == (33, 3) == minimum.shape
    err = (reference.dequantize_int8_affine(q, scale, minimum) - w).abs()
    assert (err <= scale.repeat_interleave(32, dim=1) / 2 + 1e-6).all()
    # a GGUF Q4_1 block (d * q + m, q in 0..15 with 0 and 15 used) lands on the int8 grid: scale = d / 17
    g = torch.Generator().manual_seed(3)
    q4 = torch.randint(0, 16, (8, 4, 32), generator=g).float()
    q4[..., 0], q4[..., 1] = 0, 15
    d, m = torch.rand(8, 4, 1, generator=g) * 0.01, torch.randn(8, 4, 1, generator=g) * 0.05
    w = (d * q4 + m).reshape(8, 128)
    torch.testing.assert_close(reference.dequantize_int8_affine(*reference.quantize_int8_affine(w)), w,
                               atol=1e-7, rtol=1e-6)


def test_native_int4_layout_round_trips():
    w = weights((5, 64))
    packed, scale, minimum = reference.quantize_int4(w)
    torch.testing.assert_close(cpu.dequantize_int4(cpu.repack_int4(packed, 5, 64), scale, minimum),
                               reference.dequantize_int4(packed, scale, minimum, (5, 64)))


@pytest.mark.parametrize("shape", [(1, 64), (96, 128), (576, 1536)])
@pytest.mark.parametrize("method", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("device", DEVICES)
def test_reference_kernel_on_every_device(shape, method, device):
    _parity(method, "reference", shape, torch.float32, device, bias=False)
    _parity(method, "reference", shape, torch.bfloat16, device, bias=False)


needs_bnb = pytest.mark.skipif(not HAVE_BITSANDBYTES, reason="bitsandbytes is not installed (pip install .[dev])")


@needs_bnb
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", NF4_SHAPES)
def test_bitsandbytes_nf4_packs_exactly_like_the_reference(shape, device):
    import bitsandbytes.functional as F

    w = weights(shape, device=device)
    packed, state = F.quantize_4bit(w, blocksize=reference.NF4_BLOCKSIZE, quant_type="nf4")
    ref_packed, ref_absmax = reference.quantize_nf4(w)
    # equal except where a value sits exactly between two code points (float rounding may go either way)
    assert (packed.reshape(-1) == ref_packed).float().mean() > 0.999
    torch.testing.assert_close(state.absmax, ref_absmax)


@needs_bnb
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(33, 576), (576, 1536), (1536, 576)])
@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_bitsandbytes_kernels_match_reference(method, shape, device):
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
    for dtype in dtypes:
        _parity(method, "bitsandbytes", shape, dtype, device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(not triton_nf4.HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("shape", [(48, 256), (1000, 512), (4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("rows", [(1,), (1, 2), (4,), (2, 9)])  # decode GEMV up to 4 rows, a matmul above
def test_triton_nf4_matches_reference(shape, rows):
    for dtype in (torch.bfloat16, torch.float16):
        _parity("nf4", "triton", shape, dtype, "cuda", rows=rows)


def test_quantize_linears_replaces_every_linear_and_keeps_the_rest():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Sequential(nn.Linear(128, 64, bias=False)),
                          nn.LayerNorm(64))
    x = torch.randn(4, 64)
    want = model(x)
    assert quantize_linears(model, "int8") == 2
    assert isinstance(model[0], QuantLinear) and isinstance(model[2][0], QuantLinear)
    assert isinstance(model[3], nn.LayerNorm)
    assert model[0].weight_bytes() < 64 * 128 * 4 / 3  # int8 + one fp scale per row, not fp32
    got = model(x)
    assert ((got - want).abs().max() / want.abs().max()) < 2e-2


@needs_cc
def test_native_kernel_refuses_tensors_it_would_read_out_of_bounds():
    q, scale, minimum = reference.quantize_int8_affine(weights((8, 64)))
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="inconsistent"):
        cpu.affine_linear(x, q[:4], 8, scale, minimum)  # fewer codes than the scales say
    with pytest.raises(ValueError, match="inconsistent"):
        cpu.affine_linear(x, q, 8, scale, minimum, bias=torch.zeros(3))
    with pytest.raises(ValueError, match="contiguous CPU"):
        cpu.affine_linear(x, q.t(), 8, scale, minimum)
    with pytest.raises(ValueError, match="features"):
        cpu.affine_linear(torch.randn(2, 32), q, 8, scale, minimum)


# --- oneDNN prepacked float32 linears (swarm_kernels/packed.py) -----------------------------------------------

needs_onednn = pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (576, 1536), (1536, 576), (49152, 576)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_matches_nn_linear(shape, bias):
    out_features, in_features = shape
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    expected_weight = linear.weight.detach().clone()
    fast = packed.PackedLinear(linear)
    for x in (torch.randn(1, in_features), torch.randn(3, 5, in_features), torch.randn(in_features, 9).t()):
        expected = nn.functional.linear(x, expected_weight, linear.bias)
        got = fast(x)
        assert got.shape == expected.shape and got.dtype == torch.float32
        exact = exact_linear(x, expected_weight, linear.bias)
        bound = tolerance.parity_bound(x, expected_weight, linear.bias, exact, tolerance.Rounding())
        for name, out in (("oneDNN packed", got), ("MKL", expected)):  # any order of the sums: gamma_{K+1}
            assert_within_bound(out, exact, bound, f"{name} {shape}, input {tuple(x.shape)}")


@needs_onednn
@pytest.mark.xfail(os.environ.get("SWARM_CAPPED_ISA") == "SSE41", strict=True,
                   reason="oneDNN's SSE4.1 kernels (CPUs without AVX2; none of this project's) compute a row alone and "
                          "in a batch in different orders: within the bound, not the same bits")
def test_packed_linear_gives_a_row_the_same_bits_alone_or_in_a_batch():
    torch.manual_seed(1)
    fast = packed.PackedLinear(nn.Linear(576, 1536))
    x = torch.randn(33, 576)
    alone = torch.cat([fast(x[i : i + 1]) for i in range(len(x))])
    for rows in (2, 4, 8, 16, 33):
        assert torch.equal(fast(x[:rows]), alone[:rows]), rows


@needs_onednn
def test_pack_linears_replaces_float32_cpu_linears_only_and_counts_their_bytes():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Sequential(nn.Linear(32, 32, bias=False)),
                          nn.Linear(32, 16).to(torch.bfloat16))
    quantize_linears(model[2], "int8")
    assert packed.pack_linears(model) == 1  # the first: the quantized one and the bf16 one stay as they are
    assert isinstance(model[0], packed.PackedLinear) and isinstance(model[2][0], QuantLinear)
    assert type(model[3]) is nn.Linear
    assert packed.packed_bytes(model) == 64 * 32 * 4
    with pytest.raises(TypeError, match="float32 on the CPU"):
        model[0](torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"float32 nn\.Linear"):
        packed.PackedLinear(model[3])


# --- the code paths of other CPUs -----------------------------------------------------------------------------------

# oneDNN, MKL and torch's own kernels choose their code by the CPU at run time; capped (the environment variables are
# read once, at start), a process runs the code a CPU with less would, so these CPU paths are all tested on a CPU that
# has more. (isa, env, what oneDNN's verbose log then says, what torch says)
CAPPED_ISAS = [
    pytest.param({"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
                 "isa:Intel AVX2", "AVX2", id="avx2", marks=pytest.mark.skipif(
                     not AVX512, reason="this CPU's best is AVX2: the tests above already ran its AVX2 paths")),
    pytest.param({"ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                  "ATEN_CPU_CAPABILITY": "default"}, "isa:Intel SSE4.1", "DEFAULT", id="sse4"),
]
PATH_TESTS = "packed_linear or torch_cpu or bitsandbytes_kernels"  # those whose code the caps above change


@needs_x86
@pytest.mark.skipif(os.environ.get("SWARM_CAPPED_ISA") is not None, reason="already inside a capped run")
@pytest.mark.parametrize(("env", "onednn_says", "torch_says"), CAPPED_ISAS)
def test_parity_on_the_code_paths_of_other_cpus(env, onednn_says, torch_says):
    script = ("import sys, torch, pytest; print('torch capability', torch.backends.cpu.get_cpu_capability()); "
              f"sys.exit(pytest.main(['-q', '-s', '-p', 'no:cacheprovider', {__file__!r}, '-k', {PATH_TESTS!r}]))")
    env = {**os.environ, **env, "ONEDNN_VERBOSE": "1", "SWARM_CAPPED_ISA": env["ONEDNN_MAX_CPU_ISA"]}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                         cwd=Path(__file__).parents[2])
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-4000:]
    assert f"torch capability {torch_says}" in log, log[-4000:]  # the caps took effect
    assert onednn_says in log or not packed.available(), log[-4000:]
