"""swarm_kernels/cpu_a8.c: 4- and 8-bit weights against int8 activations.

Its arithmetic is defined exactly (cpu_a8.c's header): the activations' quantization is reproduced bit for bit in torch,
the integer dot products are exact, so every build (VNNI, AVX2, portable: each run here where this CPU can) must give
the same bits, equal to the float64 evaluation of the same formula within the float32 roundings of its per-group steps;
a row gives the same bits alone or in a batch, on one thread or two."""

from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import pytest
import torch

from swarm_kernels import cpu, cpu_a8, reference
from swarm_kernels.quant import QuantLinear

X86 = platform.machine() in ("x86_64", "AMD64")
needs_x86 = pytest.mark.skipif(not X86, reason="x86 builds: this CPU is not x86-64")
FLAGS_TEXT = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
VNNI = " avx512_vnni" in FLAGS_TEXT and " avx512bw" in FLAGS_TEXT


def _march(*arch: str) -> tuple[str, ...]:
    flags = [f for f in cpu.FLAGS if f != "-march=native"]
    return (*flags, *arch)


BUILDS = {
    "vnni": _march("-march=x86-64-v4", "-mavx512vnni"),
    "avx2": _march("-march=x86-64-v3"),
    "portable": _march("-march=x86-64"),
}
PATHS = {"vnni": "avx512vnni", "avx2": "avx2", "portable": "portable"}
RUNNABLE = [pytest.param("vnni", marks=[needs_x86, pytest.mark.skipif(
                not VNNI, reason="this CPU has no AVX-512 VNNI: that build cannot run here")]),
            pytest.param("avx2", marks=needs_x86), pytest.param("portable", marks=needs_x86)]


@functools.cache
def _library(name: str):
    library = cpu_a8.build(BUILDS[name])
    assert library is not None, f"cpu_a8.c did not build with {BUILDS[name]}"
    return library


@functools.cache
def _native():
    """This machine's own build (-march=native)."""
    library = cpu_a8.build(tuple(cpu.FLAGS))
    assert library is not None
    return library


@pytest.fixture(autouse=True)
def _kernel():
    if not cpu_a8.available():
        pytest.skip("no working C compiler for swarm_kernels/cpu_a8.c")


def _weight(n: int, k: int, seed: int = 0, bias: bool = False, bits: int = 4):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if bits == 8:
        codes, scale, minimum = reference.quantize_int8_affine(w)
    else:
        packed, scale, minimum = reference.quantize_int4(w)
        codes = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(n, k)  # reference.py's order, one a byte
    return codes, scale, minimum, (torch.randn(n, generator=g) if bias else None)


def _call(library, weight_args: tuple, x: torch.Tensor, monkeypatch, bits: int = 4) -> torch.Tensor:
    """x through a weight repacked and called by `library` (VNNI builds repack 8-bit codes their own way)."""
    monkeypatch.setattr(cpu_a8, "_library", lambda: library)
    return cpu_a8.Weight(*weight_args, bits=bits)(x)


@pytest.mark.parametrize("build", RUNNABLE)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("n", "k"), [(1, 32), (200, 96), (576, 576), (192, 576), (576, 1536)])
def test_every_build_gives_the_same_bits_as_the_formula(build, bits, n, k, monkeypatch):
    library, native = _library(build), _native()
    assert library.a8_path().decode() == PATHS[build]
    codes, scale, minimum, bias = _weight(n, k, seed=n + k, bias=n == 200, bits=bits)
    if bits == 8:
        codes[0, :32] = 255  # the largest products: 8-bit codes must not saturate (AVX2's vpmaddubsw would)
    x = torch.randn(13, k, generator=torch.Generator().manual_seed(k)) * 3
    x[0, :32] = 1.0  # every activation of a group at 127 against those codes
    y = _call(library, (codes, scale, minimum, bias), x, monkeypatch, bits)
    # builds that differ: the float steps are not the same FMAs in the same order
    assert torch.equal(y, _call(native, (codes, scale, minimum, bias), x, monkeypatch, bits))
    exact = cpu_a8.reference(x, codes, scale, minimum, bias).double()
    # per group two float32 FMAs and a product: a few units in the last place of the running sum's magnitude
    bound = 1e-6 * (exact.abs().max() + 1) * (k // 32 + 2)
    assert (y.double() - exact).abs().max() <= bound


@pytest.mark.parametrize("build", RUNNABLE)
def test_quantization_matches_its_torch_reference_bit_for_bit(build, monkeypatch):
    monkeypatch.setattr(cpu_a8, "_library", lambda: _library(build))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 96, generator=g) * 10
    x[1, :32] = 0.0                                    # an all-zero group: codes 0, scale 0
    x[2, :32] = torch.tensor([127.0] + [j + 0.5 for j in range(-15, 16)])  # amax 127: x * 1.0, ties to even
    x[3, 7] = 1e30                                     # one huge value: the rest of its group rounds to 0
    x[4, :32] = 0.0
    x[4, 3], x[4, 9] = 1e-37, -5e-38                   # 127 / amax overflows: the group counts as zeros
    x[5, 40] = float("inf")                            # sx NaN: NaN out
    xq, sx, t = cpu_a8.quantize(x.contiguous())
    rq, rs, rt = cpu_a8.quantize_reference(x)
    assert torch.equal(xq, rq)
    assert torch.equal(sx.nan_to_num(7.0), rs.nan_to_num(7.0)) and torch.equal(t.nan_to_num(7.0), rt.nan_to_num(7.0))
    assert (xq[4, :32] == 0).all() and sx[4, 0] == 0 and sx[5, 1].isnan() and (xq[5, 32:64] == 0).all()
    assert xq.abs().max() <= 127 and sx[1, 0] == 0 and (xq[1, :32] == 0).all()
    assert xq[2, 1:6].tolist() == [-14, -14, -12, -12, -10]  # -14.5, -13.5, -12.5, -11.5, -10.5


@pytest.mark.parametrize("build", RUNNABLE)
def test_non_finite_activations_give_nan_in_their_rows_only(build, monkeypatch):
    codes, scale, minimum, _ = _weight(40, 64)
    x = torch.randn(3, 64)
    x[0, 3], x[2, 40] = float("nan"), float("inf")
    y = _call(_library(build), (codes, scale, minimum), x, monkeypatch)
    assert y[0].isnan().all() and y[2].isnan().all() and y[1].isfinite().all()


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_gives_the_same_bits_alone_or_batched(threads):
    codes, scale, minimum, bias = _weight(576, 576, bias=True)
    weight = cpu_a8.Weight(codes, scale, minimum, bias)
    x = torch.randn(130, 576, generator=torch.Generator().manual_seed(3))
    saved = cpu.threads()
    try:
        cpu.set_threads(threads)
        batched = weight(x)
        pieces = [weight(x[i : i + 1]) for i in (0, 5, 64, 129)] + [weight(x[:7]), weight(x[100:117])]
    finally:
        cpu.set_threads(saved)
    alone = torch.cat(pieces[:4])
    assert torch.equal(alone, batched[[0, 5, 64, 129]])
    assert torch.equal(pieces[4], batched[:7]) and torch.equal(pieces[5], batched[100:117])


def test_its_error_against_float32_activations_is_the_activations_rounding():
    """What int8 activations cost: the result differs from the float32-activation kernel's by what rounding each
    group of activations to 255 levels does (~0.5% of the output's norm for Gaussian activations), no more."""
    codes, scale, minimum, _ = _weight(1536, 576)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(4))
    y = cpu_a8.Weight(codes, scale, minimum)(x)
    dequantized = (codes.float().reshape(1536, 18, 32) * scale[..., None] + minimum[..., None]).reshape(1536, 576)
    exact = x.double() @ dequantized.double().T
    error = ((y.double() - exact).norm() / exact.norm()).item()
    assert 1e-4 < error < 0.01


def test_native_layers_use_it_only_when_asked():
    """cpu.set_activations('int8') switches QuantLinear's native int8 and int4 layers and cpu.Weight (the lean decode
    path's) to int8 activations, not a layer that opted out (an LM head); float32 switches back."""
    linear = torch.nn.Linear(64, 48, bias=True)
    layer, layer8 = QuantLinear(linear, "int4", "native"), QuantLinear(linear, "int8", "native")
    head = QuantLinear(linear, "int8", "native")
    head.follows_activations = False
    x = torch.randn(5, 64)
    codes = {4: cpu.int4_codes(layer.qweight, 48, 64), 8: layer8.qweight}
    saved = cpu.activations()
    try:
        cpu.set_activations("float32")
        floats = {4: layer(x), 8: layer8(x)}
        assert torch.equal(cpu.Weight(layer.qweight, 4, layer.scale, layer.minimum, layer.bias)(x), floats[4])
        assert torch.equal(head(x), floats[8])
        cpu.set_activations("int8")
        for bits, module in ((4, layer), (8, layer8)):
            ints = module(x)
            assert not torch.equal(ints, floats[bits])
            want = cpu_a8.reference(x, codes[bits], module.scale, module.minimum, module.bias)
            assert torch.allclose(ints, want, rtol=0, atol=1e-5)
            weight = cpu.Weight(module.qweight, bits, module.scale, module.minimum, module.bias)
            assert torch.equal(weight(x), ints)
        assert torch.equal(head(x), floats[8])  # the head keeps float32 activations
        cpu.set_activations("float32")
        assert torch.equal(layer(x), floats[4])
    finally:
        cpu.set_activations(saved)


def test_the_setting_is_validated(monkeypatch):
    with pytest.raises(ValueError, match="activations must be one of"):
        cpu.set_activations("int3")
    saved = cpu.activations()
    try:
        monkeypatch.setattr(cpu_a8, "available", lambda: False)
        assert cpu.set_activations("int8") == "float32"  # no kernel: float32, with a warning
    finally:
        cpu.set_activations(saved)


def test_inconsistent_weights_and_inputs_are_refused():
    codes, scale, minimum, _ = _weight(16, 64)
    with pytest.raises(ValueError, match="inconsistent"):
        cpu_a8.Weight(codes[:, :40], scale, minimum)
    with pytest.raises(ValueError, match="inconsistent"):
        cpu_a8.Weight(codes, scale[:8], minimum)
    with pytest.raises(ValueError, match=r"0\.\.15"):
        cpu_a8.Weight(codes * 16, scale, minimum)  # 8-bit codes called 4-bit
    with pytest.raises(ValueError, match="inconsistent"):
        cpu_a8.Weight(codes, scale, minimum, bits=6)
    weight = cpu_a8.Weight(codes, scale, minimum)
    with pytest.raises(ValueError, match="features"):
        weight(torch.randn(2, 32))


def _fixed(n: int, k: int, m: int, bits: int):
    """Weights and inputs from integer arithmetic and exact float32 divisions: the same tensors on every machine."""
    r, c = torch.arange(n).reshape(n, 1), torch.arange(k).reshape(1, k)
    codes = ((r * 7919 + c * 104729 + (r * c) % 13) % (16 if bits == 4 else 256)).to(torch.uint8)
    g = torch.arange(k // 32).reshape(1, -1)
    scale = (1.0 / (64 + (r + g) % 7).float()).contiguous()
    i = torch.arange(m).reshape(m, 1)
    x = (((i * 31 + c * 17 + (i * c) % 11) % 1000 - 500).float() / 97.0).contiguous()
    return codes, scale, (-8.0 * scale).contiguous(), x


# sha256 (first 24 hex digits) of the outputs below: the same from every build on a 2-core AMD EPYC (Zen 4) with
# torch 2.13 and on the H200 machine's 16-core Intel Xeon with torch 2.11 (2026-12-04), VNNI, AVX2 and portable alike
FIXED_DIGEST = "876f4539372484a2c6a6ef0e"


@pytest.mark.parametrize("build", RUNNABLE)
def test_the_bits_are_the_same_on_every_machine(build, monkeypatch):
    monkeypatch.setattr(cpu_a8, "_library", lambda: _library(build))
    digest = hashlib.sha256()
    for bits in (4, 8):
        for n, k, m in ((576, 576, 16), (200, 1536, 5), (49152, 576, 3)):
            codes, scale, minimum, x = _fixed(n, k, m, bits)
            digest.update(cpu_a8.Weight(codes, scale, minimum, bits=bits)(x).numpy().tobytes())
    assert digest.hexdigest()[:24] == FIXED_DIGEST


def test_a_span_loaded_for_int8_activations_counts_its_repacked_weights_at_once(tiny_model_dir, monkeypatch):
    """load_span repacks every projection when the mode is int8, lean path or not: weight_bytes holds them before
    the first forward (a peer sizes its KV budget from it)."""
    from swarm.model.precision import Precision
    from swarm.model.source import ModelSource
    from swarm.model.span import load_span

    monkeypatch.setenv("SWARM_LEAN_DECODE", "0")
    saved = cpu.activations()
    try:
        cpu.set_activations("int8")
        span = load_span(ModelSource("llama", tiny_model_dir("llama")), 0, 2,
                         precision=Precision("cpu", torch.float32, "int4"))
        at_load = span.weight_bytes()
        span(torch.randn(1, 3, span.hidden_size), span.new_cache(8), 0)
        assert span.weight_bytes() == at_load
    finally:
        cpu.set_activations(saved)
    floats = load_span(ModelSource("llama", tiny_model_dir("llama")), 0, 2,
                       precision=Precision("cpu", torch.float32, "int4"))
    assert at_load > 1.9 * floats.weight_bytes()  # both layouts held
