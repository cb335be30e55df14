"""The client's LM head on the native int8 kernel where that kernel holds the weight exactly (the default model's
head is its GGUF Q8_0 embedding table): swarm_kernels.quant.exact_native_int8 and swarm.model.head.LocalHead."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from swarm.model.head import CodedEmbedding, LocalHead
from swarm_kernels import cpu, packed, quant, reference

needs_cc = pytest.mark.skipif(not cpu.available(), reason="no working C compiler for swarm_kernels/cpu_affine.c")


def q8_0_linear(out_features: int, in_features: int, seed: int = 0) -> nn.Linear:
    """A linear whose weight is what GGUF Q8_0 dequantizes to: int8 codes times a float16 scale per block of 32."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (out_features, in_features // 32, 32), generator=generator).float()
    scale = (torch.rand(out_features, in_features // 32, 1, generator=generator) * 1e-3 + 1e-4).half().float()
    linear = nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = (codes * scale).reshape(out_features, in_features)
    return linear


@needs_cc
def test_a_q8_0_weight_runs_on_the_int8_kernel_with_its_own_values():
    linear = q8_0_linear(300, 576)
    native = quant.exact_native_int8(linear)
    assert isinstance(native, quant.NativeLinear) and native.method == "int8"
    dequantized = reference.dequantize_int8_affine(native.qweight, native.scale, native.minimum)
    assert torch.equal(dequantized, linear.weight), "the kernel's weight is not the layer's"
    x = torch.randn(33, 576, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = linear(x)
    # the same products summed in another order: float32 rounding of 576 terms, far below a logit's spacing
    torch.testing.assert_close(native(x), expected, atol=1e-4, rtol=1e-5)
    tile_unit = cpu.amx()
    try:
        cpu.set_amx(False)  # (where the kernel would take the CPU's tile unit for batches: without it, as elsewhere)
        alone = torch.cat([native(x[i : i + 1]) for i in range(len(x))])
        for rows in (2, 16, 33):
            assert torch.equal(native(x[:rows]), alone[:rows]), rows  # a row's logits alone or batched: same bits
    finally:
        cpu.set_amx(bool(tile_unit))
    if tile_unit:  # swarm_kernels/cpu_amx.h: the same bits in any call of tile_unit (5) rows or more
        batched = native(x)
        for rows in (2, 5, 16):
            assert torch.equal(native(x[:rows]), (batched if rows >= tile_unit else alone)[:rows]), rows
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)


@needs_cc
def test_float_weights_stay_off_the_int8_kernel_after_a_look_at_their_first_rows(monkeypatch):
    quantized: list[int] = []
    real = reference.quantize_int8_affine

    def counting(weight, *args, **kwargs):
        quantized.append(weight.shape[0])
        return real(weight, *args, **kwargs)

    monkeypatch.setattr(reference, "quantize_int8_affine", counting)
    assert quant.exact_native_int8(nn.Linear(576, 5000)) is None
    assert quantized == [quant.EXACT_SAMPLE_ROWS]  # the sample ruled it out; the whole weight was never quantized


@needs_cc
def test_a_weight_exact_in_its_first_rows_only_is_refused():
    linear = q8_0_linear(200, 64)
    linear.weight.data[150, 3] += 1e-7  # off the grid, past the rows looked at first
    assert quant.exact_native_int8(linear) is None
    assert quant.exact_native_int8(q8_0_linear(200, 64)) is not None


def tiny_head(linear: nn.Linear) -> LocalHead:
    config = LlamaConfig(vocab_size=linear.out_features, hidden_size=linear.in_features, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)
    embeddings = nn.Embedding(linear.out_features, linear.in_features)
    embeddings.weight = linear.weight  # tied, as the default model's
    return LocalHead(config, embeddings, nn.RMSNorm(linear.in_features), linear)


@needs_cc
def test_the_local_head_uses_the_int8_kernel_unless_told_not_to(monkeypatch):
    linear = q8_0_linear(1000, 64, seed=2)
    hidden = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(3))
    head = tiny_head(linear)
    assert isinstance(head.lm_head, quant.NativeLinear) and isinstance(head.embeddings, CodedEmbedding)
    ids = torch.tensor([[0, 999, 5], [7, 7, 123]])
    assert torch.equal(head.embed(ids), linear.weight[ids])  # the tied table's own values
    with torch.inference_mode():
        expected = linear(head.norm(hidden))
    torch.testing.assert_close(head.logits(hidden), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(head.logits(hidden).argmax(-1), expected.argmax(-1))
    monkeypatch.setenv("SWARM_NATIVE_HEAD", "0")
    fallback = tiny_head(q8_0_linear(1000, 64, seed=2))
    assert isinstance(fallback.lm_head, packed.PackedLinear if packed.available() else nn.Linear)
    monkeypatch.delenv("SWARM_NATIVE_HEAD")
    assert not isinstance(tiny_head(nn.Linear(64, 1000, bias=False)).lm_head, quant.NativeLinear)  # float weights


@needs_cc
@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's thread pool is Linux only")
def test_one_row_of_a_head_sized_weight_is_shared_among_threads_with_the_same_bits():
    library = cpu._library()
    linear = q8_0_linear(16384, 576, seed=4)  # 9.4 M weights: at least ONE_ROW_WORK (8 Mi)
    native = quant.exact_native_int8(linear)
    assert native is not None
    small = quant.exact_native_int8(q8_0_linear(1000, 576, seed=5))
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(6))
    alone, small_alone = native(x), small(x)
    try:
        assert cpu.set_threads(2, library) == 2
        before = library.affine_split_calls()
        assert torch.equal(native(x), alone)
        assert library.affine_split_calls() == before + 1  # one row, shared
        assert torch.equal(small(x), small_alone)
        assert library.affine_split_calls() == before + 1  # one row of a block-sized weight: still alone
    finally:
        cpu.set_threads(1, library)


@needs_cc
def test_the_default_models_head_is_its_q8_0_table_on_the_int8_kernel(monkeypatch):
    from swarm.model.head import load_head
    from swarm.model.source import resolve_model

    head = load_head(resolve_model())
    assert isinstance(head.lm_head, quant.NativeLinear)
    assert head.lm_head.qweight.nbytes == head.vocab_size * head.hidden_size  # a byte a weight, not four
    # the embeddings are read from the same codes: no float32 table kept, the same values
    assert isinstance(head.embeddings, CodedEmbedding)
    assert not any(p.dtype == torch.float32 and p.numel() >= head.vocab_size for p in head.parameters())
    monkeypatch.setenv("SWARM_NATIVE_HEAD", "0")
    table = load_head(resolve_model()).embeddings.weight
    every = torch.arange(head.vocab_size)
    assert torch.equal(head.embed(every[None]), table[None])
    assert torch.equal(reference.dequantize_int8_affine(head.lm_head.qweight, head.lm_head.scale,
                                                        head.lm_head.minimum), table)


@pytest.mark.parametrize("device", [
    pytest.param("cpu"),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                     reason="no CUDA device")])])
def test_a_head_computes_on_its_device_and_hands_back_cpu_tensors(device):
    """GATEWAY_HEAD_DEVICE: the embedding and head compute where they are told; what goes in and out stays on the CPU
    (the client sends, receives and samples there), and the logits are the layers' own within float32 rounding."""
    linear = nn.Linear(64, 1000, bias=False)
    with torch.no_grad():
        linear.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    config = LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, final_logit_softcapping=30.0)
    embeddings, norm = nn.Embedding(1000, 64), nn.RMSNorm(64)
    ids, hidden = torch.tensor([[0, 999, 5]]), torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        want_hidden = embeddings(ids)
        want = torch.tanh(linear(norm(hidden)) / 30.0) * 30.0
    head = LocalHead(config, embeddings, norm, linear, device=device)
    assert head.device.type == device
    if device != "cpu":
        assert type(head.lm_head) is nn.Linear  # the native and packed heads are the CPU's
        assert {p.device.type for p in head.parameters()} == {device}
    got_hidden, got = head.embed(ids), head.logits(hidden)
    assert got_hidden.device.type == "cpu" and got.device.type == "cpu" and got.dtype == torch.float32
    assert torch.equal(got_hidden, want_hidden)  # a lookup: the same values anywhere
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with a GPU would load it")
def test_a_head_on_cuda_without_a_gpu_is_refused_before_anything_loads(tmp_path):
    from swarm.model.head import load_head
    from swarm.model.source import ModelSource

    with pytest.raises(ValueError, match="sees no CUDA device"):
        load_head(ModelSource("nothing-here", tmp_path), device="cuda")  # the directory is not even read


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "granite", "gpt2", "opt", "falcon"])
def test_a_rounds_tokens_embedded_in_one_call_are_each_rows_own_embedding(family, tiny_model_dir):
    """LocalHead.embed_rows (a decode round's tokens at their sessions' positions, swarm.client.decoding) against
    embed row by row: the same bits, with learned positions (gpt2, opt), a multiplier (granite), scaled tables."""
    from swarm.model.head import load_head
    from swarm.model.source import ModelSource

    head = load_head(ModelSource(family, tiny_model_dir(family)))
    ids, positions = torch.tensor([[5], [511], [5], [0]]), [0, 17, 3, 200]
    together = head.embed_rows(ids, positions)
    alone = torch.cat([head.embed(ids[k:k + 1], positions[k]) for k in range(len(positions))])
    assert together.shape == (4, 1, head.hidden_size) and torch.equal(together, alone)
    assert (head.position_embeddings is not None) == (family in ("gpt2", "opt"))
    if head.position_embeddings is not None:  # the positions count: row 0 and row 2 hold the same token
        assert not torch.equal(together[0], together[2])
