"""kernels/: the reference quantizers' own guarantees, and every fast path's parity with the reference.

Tolerances (max |fast - reference| / max |reference| over the output), by kernel and activation dtype:
"""

from __future__ import annotations

import platform

import pytest
import torch
from torch import nn

from kernels import cpu, packed, reference, triton_nf4
from kernels.quant import HAVE_BITSANDBYTES, QuantLinear, kernel_for, quantize_linears

# kernel → activation dtype → relative tolerance against reference.*_linear (which computes in float32). torch's CPU
# int8 kernel rounds activations to bf16 (8 mantissa bits: ~0.4% per element, averaging out over K); LLM.int8 also
# rounds activations to int8 per row; bf16/fp16 inputs carry their own rounding.
TOLERANCE = {
    ("native", torch.float32): 1e-5,  # float32 throughout: only the order of the sums differs
    ("native", torch.bfloat16): 2e-2,  # the bf16 output's own rounding
    ("torch", torch.float32): 1e-2,
    ("torch", torch.bfloat16): 2e-2,  # int8 and int4 alike
    ("bitsandbytes", torch.float32): 3e-2,
    ("bitsandbytes", torch.bfloat16): 4e-2,
    ("bitsandbytes", torch.float16): 3e-2,
    ("triton", torch.bfloat16): 2e-2,
    ("triton", torch.float16): 1e-2,
    ("reference", torch.float32): 1e-6,
    ("reference", torch.bfloat16): 2e-2,
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


needs_cc = pytest.mark.skipif(not cpu.available(), reason="no working C compiler for kernels/cpu_affine.c")


@needs_cc
def test_dispatch_picks_the_native_kernel_on_cpu_and_refuses_unknown_methods():
    assert kernel_for("int8", torch.device("cpu")) == "native"
    assert kernel_for("int4", torch.device("cpu")) == "native"
    assert kernel_for("int4", torch.device("cpu"), in_features=48, out_features=32) == "reference"
    assert kernel_for("int8", torch.device("cpu"), in_features=48) == "torch"  # 48 % 32 != 0, 48 % 16 == 0
    assert kernel_for("nf4", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="unknown quantization"):
        kernel_for("int3", torch.device("cpu"))


def _parity(method, kernel, shape, dtype, device, bias=True, rows=(2, 3)):
    w = weights(shape, device=device, dtype=dtype)
    linear = nn.Linear(shape[1], shape[0], bias=bias, device=device, dtype=dtype)
    linear.weight.data.copy_(w)
    fast = QuantLinear(linear, method, kernel)
    x = torch.randn(*rows, shape[1], generator=torch.Generator().manual_seed(1)).to(device, dtype)
    got = fast(x)
    assert got.shape == (*rows, shape[0]) and got.dtype == dtype
    # the fast kernel may store the weight in its own layout: the reference computes from its own quantization
    if method == "int8" and kernel == "native":
        want = reference.int8_affine_linear(x, *reference.quantize_int8_affine(w), linear.bias)
    elif method == "int8":
        want = reference.int8_linear(x, *reference.quantize_int8(w), linear.bias)
    elif method == "int4":
        want = reference.int4_linear(x, *reference.quantize_int4(w), shape, linear.bias)
    else:
        want = reference.nf4_linear(x, *reference.quantize_nf4(w), shape, linear.bias)
    rel = ((got.float() - want).abs().max() / want.abs().max()).item()
    assert rel <= TOLERANCE[(kernel, dtype)], f"{kernel} {method} {shape} {dtype}: relative error {rel:.2e}"


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


NATIVE_SHAPES = [(1, 32), (7, 96), (33, 64), (576, 1536), (1536, 576)]  # K a multiple of 32; any N


@needs_cc
@pytest.mark.parametrize("shape", NATIVE_SHAPES)
@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [(1,), (2, 3), (5,), (4, 4), (40,)])  # decode steps to a prefill chunk
def test_native_cpu_kernel_matches_reference(shape, method, rows):
    _parity(method, "native", shape, torch.float32, "cpu", rows=rows)
    _parity(method, "native", shape, torch.bfloat16, "cpu", bias=False, rows=rows)


@needs_cc
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_native_kernel_gives_a_row_the_same_bits_alone_or_in_a_batch(method):
    layer = QuantLinear(nn.Linear(576, 97), method, "native")
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(2))
    batched = layer(x)
    for i in range(16):
        assert torch.equal(layer(x[i : i + 1])[0], batched[i]), i


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
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the portable build is checked with x86-64-v3 flags")
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_native_kernel_without_avx512_matches_reference_too(method):
    """Machines without AVX-512 run the kernel's portable C loops: built here with AVX2 flags only, same parity."""
    flags = tuple(f if f != "-march=native" else "-march=x86-64-v3" for f in cpu.FLAGS)
    library = cpu.build(flags)
    assert library is not None
    w = weights((97, 192))
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(4))
    bias = torch.randn(97)
    for rows in (x[:1], x):
        if method == "int8":
            q, scale, minimum = reference.quantize_int8_affine(w)
            want = reference.int8_affine_linear(rows, q, scale, minimum, bias)
            got = cpu.affine_linear(rows, q, 8, scale, minimum, bias, library=library)
        else:
            packed, scale, minimum = reference.quantize_int4(w)
            want = reference.int4_linear(rows, packed, scale, minimum, (97, 192), bias)
            got = cpu.affine_linear(rows, cpu.repack_int4(packed, 97, 192), 4, scale, minimum, bias, library=library)
        assert ((got - want).abs().max() / want.abs().max()).item() <= TOLERANCE[("native", torch.float32)]


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


# --- oneDNN prepacked float32 linears (kernels/packed.py) -----------------------------------------------------------

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
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-6  # float32: only the sums' order


@needs_onednn
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
