"""Accuracy of quantized spans on the default model (SmolLM2-135M-Instruct) over a bundled 512-token text.

The default model's weights come from a GGUF Q4_1 file (4-bit, groups of 32 with a scale and a minimum), and the
model is small enough that any perturbation flips near-ties: 2.9% of positions have a top-1/top-2 logit margin under
0.05, and running the span in plain bf16 alone agrees with fp32 on 97.5% of next tokens. Measured here (top-1
agreement with fp32 / perplexity change), evaluated as 4-token steps through the KV cache, the decode path:

    native int8 (affine, groups of 32, fp32 activations; the CPU default)   100% / +0.000%, logits within 2e-4
    native int4 (groups of 32, fp32 activations; default for this model)    100% / +0.000%, logits within 2e-4
    native int8 or int4 with int8 activations (--activations int8)          95.7% / +0.84% (prefill: 96.1% / -0.13%)
    torch int8 (one scale per row, bf16 activations; SWARM_KERNELS=torch)   93.6% / +0.90%
    torch int4 (groups of 32, bf16 scales and activations; the same)        99.0% / +0.00%
    nf4 (blocks of 64, bitsandbytes' format)                                56% / +128%: a second 4-bit grid on top
                                                                            of Q4_1's does not fit it

Groups of 32 with a minimum hold Q4_1's grid exactly (int8: scale = d / 17), so on this checkpoint the native
formats are lossless up to float rounding; a per-row int8 scale is not (symmetric int8 in blocks of 32, llama.cpp's
Q8_0, measured 95.5% in a one-off run). The torch and nf4 bounds below are the measured values with a small margin
(regression guards); the native ones are the issue's goals (int8 >= 99% top-1 and +1% perplexity).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from swarm.model.head import load_head
from swarm.model.precision import Precision
from swarm.model.quality import chain_logits, compare
from swarm.model.source import DEFAULT_MODEL_ID, resolve_model
from swarm.model.span import load_span
from swarm_kernels import cpu, cpu_a8
from swarm_kernels.quant import quantize_linears

TEXT = Path(__file__).parent.parent / "data" / "eval_text.txt"
MAX_TOKENS = 512


@pytest.fixture(scope="module")
def setup():
    source = resolve_model(DEFAULT_MODEL_ID)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"][:, :MAX_TOKENS]
    assert ids.shape[1] == MAX_TOKENS
    head = load_head(source)
    reference = chain_logits(head, [load_span(source, 0, 30)], ids)
    return source, head, ids, reference


def quantized(source, quant: str, layout=((0, 15), (15, 30))):
    return [load_span(source, s, e, precision=Precision("cpu", torch.float32, quant)) for s, e in layout]


# quant → (weights as a fraction of fp32 at most, top-1 agreement at least, perplexity increase at most)
NATIVE_BOUNDS = {
    "int4": (0.19, 0.99, 0.01),  # 4 bits + a float32 scale and minimum per 32 weights: 3/16 of fp32
    "int8": (0.32, 0.99, 0.01),  # 8 bits + the same: 5/16 of fp32
}


@pytest.mark.skipif(not cpu.available(), reason="no working C compiler for swarm_kernels/cpu_affine.c")
@pytest.mark.parametrize("quant", NATIVE_BOUNDS)
def test_int8_and_int4_spans_on_the_native_cpu_kernel(setup, quant):
    source, head, ids, reference = setup
    size, top1, ppl = NATIVE_BOUNDS[quant]
    spans = quantized(source, quant)
    assert all(span.kernels() == {"native"} for span in spans)
    two_blocks_fp32 = load_span(source, 0, 2).weight_bytes()
    assert sum(span.weight_bytes() for span in spans) < 15 * two_blocks_fp32 * size
    for chunk in (4, None):  # decode-sized steps (the kernel's own loop), then one prefill (dequantize + matmul)
        result = compare(reference, chain_logits(head, spans, ids, chunk=chunk), ids)
        print(f"{quant} native, chunk {chunk}: {result}")
        assert result.top1_agreement >= top1, result
        assert result.perplexity_increase <= ppl, result
        assert result.max_abs_logit_diff < 1e-2, result


@pytest.mark.skipif(not cpu_a8.available(), reason="no working C compiler for swarm_kernels/cpu_a8.c")
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_native_spans_with_int8_activations(setup, quant):
    """What `--activations int8` costs on this model: about what bf16 activations cost it (97.3% / -0.2% measured
    the same way), against the native formats' lossless 100% with float32 activations (int8 and int4 then give the
    same figures: both hold the checkpoint's Q4_1 values exactly)."""
    source, head, ids, reference = setup
    spans = quantized(source, quant)
    saved = cpu.activations()
    try:
        cpu.set_activations("int8")
        for chunk in (4, None):
            result = compare(reference, chain_logits(head, spans, ids, chunk=chunk), ids)
            print(f"{quant} with int8 activations, chunk {chunk}: {result}")
            assert 0.94 <= result.top1_agreement < 0.995 and result.perplexity_increase <= 0.015, result
    finally:
        cpu.set_activations(saved)


# torch's own CPU kernels (bf16 activations): the fallback without a C compiler, or SWARM_KERNELS=torch
TORCH_BOUNDS = {"int4": (0.985, 0.01), "int8": (0.93, 0.015)}


@pytest.mark.slow  # the torch fallback kernels, which peers use only without a C compiler (make test-all)
@pytest.mark.parametrize("quant", TORCH_BOUNDS)
def test_torch_kernels_lose_some_agreement_on_this_model(setup, quant):
    source, head, ids, reference = setup
    top1, ppl = TORCH_BOUNDS[quant]
    span = load_span(source, 0, 30, pack=False)
    for block in span.blocks:
        assert quantize_linears(block, quant, "torch") == 7
    result = compare(reference, chain_logits(head, [span], ids, chunk=4), ids)
    print(f"{quant} torch: {result}")
    assert top1 <= result.top1_agreement < 0.995 and result.perplexity_increase <= ppl, result


def test_nf4_spans(setup):
    source, head, ids, reference = setup
    result = compare(reference, chain_logits(head, quantized(source, "nf4"), ids), ids)
    print(f"nf4: {result}")
    assert result.perplexity_increase <= 1.5 and result.top1_agreement >= 0.5, result


def test_a_chain_may_mix_precisions(setup):
    source, head, ids, reference = setup
    spans = [load_span(source, 0, 10),
             load_span(source, 10, 20, precision=Precision("cpu", torch.float32, "int4")),
             load_span(source, 20, 30, precision=Precision("cpu", torch.bfloat16, "none"))]
    result = compare(reference, chain_logits(head, spans, ids), ids)
    print(f"fp32 + int4 + bf16: {result}")
    assert result.top1_agreement >= 0.97 and result.perplexity_increase <= 0.01, result
