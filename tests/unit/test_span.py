"""A model split into spans, each with its own KV cache, computes what the whole model computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.model import segments
from swarm.model.anatomy import SUPPORTED_FAMILIES, UnsupportedModelError, find_anatomy, load_config, skeleton
from swarm.model.head import load_head
from swarm.model.source import ModelSource
from swarm.model.span import SpanKVCache, causal_mask, load_span
from swarm.model.weights import Checkpoint
from swarm_kernels import attention, packed

ATOL = 1e-4  # fp32: split vs whole model, cached decode vs full recompute


def run_chain(head, spans, caches, ids, position):
    hidden = head.embed(ids, position)
    for span, cache in zip(spans, caches, strict=True):
        hidden = span(hidden, cache, position)
    return head.logits(hidden)


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_split_model_matches_whole_model(tiny_model_dir, family):
    path = tiny_model_dir(family)
    source = ModelSource(family, path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    head = load_head(source)
    spans = [load_span(source, 0, 2), load_span(source, 2, 5), load_span(source, 5, 6)]
    caches = [span.new_cache(64) for span in spans]
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))

    logits = run_chain(head, spans, caches, ids, 0)  # prefill
    torch.testing.assert_close(logits, reference(ids).logits, atol=ATOL, rtol=0)
    for _ in range(4):  # cached decode steps vs recomputing the whole sequence
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        logits = run_chain(head, spans, caches, next_ids, ids.shape[1] - 1)
        torch.testing.assert_close(logits[:, -1], reference(ids).logits[:, -1], atol=ATOL, rtol=0)
    # A multi-token step after a rewind (replay of a suffix) attends to the cached prefix with a causal mask.
    logits = run_chain(head, spans, caches, ids[:, 4:], 4)
    torch.testing.assert_close(logits, reference(ids).logits[:, 4:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_split_matches_whole_model(tiny_model_dir, family):
    from transformers import AutoModel

    path = tiny_model_dir(family)
    source = ModelSource(family, path)
    reference = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    head = load_head(source)
    spans = [load_span(source, 0, 2), load_span(source, 2, 6)]
    assert all(span.encoder for span in spans) and head.is_encoder
    ids = torch.randint(3, 512, (1, 11), generator=torch.Generator().manual_seed(4))
    hidden = head.embed(ids)
    for span in spans:
        hidden = span(hidden, span.new_cache(16), 0)
    with torch.inference_mode():
        expected = reference(ids).last_hidden_state
    torch.testing.assert_close(hidden, expected, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="keeps no cache"):
        spans[0](hidden, spans[0].new_cache(16), 3)
    with pytest.raises(TypeError, match="encoder-only"):
        head.logits(hidden)


def test_span_loads_only_its_own_tensors(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("llama")
    requested: list[str] = []
    original = Checkpoint.load

    def spy(self, names, dtype=None):
        names = list(names)
        requested.extend(names)
        return original(self, names, dtype)

    monkeypatch.setattr(Checkpoint, "load", spy)
    span = load_span(ModelSource("tiny", path), 2, 4)
    assert requested, "nothing was loaded"
    assert all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in requested), requested
    assert {p.device.type for p in span.parameters()} == {"cpu"}, "a parameter was left on the meta device"
    per_block = sum(1 for n in Checkpoint(path).files if n.startswith("model.layers.0."))
    assert len(requested) == 2 * per_block


def test_head_loads_tied_embeddings_without_lm_head_tensor(tiny_model_dir):
    path = tiny_model_dir("qwen2")  # tie_word_embeddings=True: the checkpoint has no lm_head.weight
    assert "lm_head.weight" not in Checkpoint(path).files
    head = load_head(ModelSource("tiny", path))
    hidden = torch.randn(1, 3, head.hidden_size)
    with torch.inference_mode():
        expected = torch.nn.functional.linear(head.norm(hidden), head.embeddings.weight)
    torch.testing.assert_close(head.logits(hidden), expected, atol=1e-5, rtol=0)  # the LM head is the embeddings


@pytest.mark.skipif(not packed.available(), reason="this torch has no oneDNN linear")
def test_float32_cpu_spans_and_head_run_prepacked_linears_and_count_their_bytes(tiny_model_dir):
    path = tiny_model_dir("llama")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    span = load_span(ModelSource("tiny", path), 2, 5)
    assert span.kernels() == {"onednn"}
    expected = sum(p.nbytes for name, p in reference.named_parameters()
                   if name.startswith(("model.layers.2.", "model.layers.3.", "model.layers.4.")))
    assert span.weight_bytes() == expected + sum(b.nbytes for b in span.rotary.buffers())  # + inv_freq
    assert isinstance(load_head(ModelSource("tiny", path)).lm_head, packed.PackedLinear)


def test_anatomy_finds_the_parts_of_a_llama(tiny_model_dir):
    config = load_config(tiny_model_dir("llama"))
    anatomy = find_anatomy(skeleton(config), config)
    assert (anatomy.blocks, anatomy.embeddings, anatomy.final_norm, anatomy.lm_head, anatomy.rotary) == (
        "model.layers", "model.embed_tokens", "model.norm", "lm_head", "model.rotary_emb")


def test_unsupported_family_is_refused_with_the_supported_list(tmp_path):
    from transformers import BloomConfig

    BloomConfig(n_layer=2, hidden_size=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'bloom' is not supported.*gpt2.*bert, roberta \(embeddings\)"):
        load_config(tmp_path)


def test_span_outside_the_model_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="outside 0:6"):
        load_span(ModelSource("tiny", tiny_model_dir("llama")), 4, 7)


def test_cache_grows_in_chunks_and_refuses_past_max_length():
    cache = SpanKVCache(num_layers=1, max_length=300)
    k = torch.randn(1, 2, 200, 4)
    keys, _ = cache.update(k, k, 0)
    cache.commit(200)
    assert keys.shape[-2] == 200 and cache.nbytes() >= 2 * k.nbytes
    keys, _ = cache.update(k[:, :, :100], k[:, :, :100], 0)
    cache.commit(100)
    assert keys.shape[-2] == 300 and torch.equal(keys[:, :, :200], k)
    with pytest.raises(ValueError, match="past its max_length 300"):
        cache.update(k[:, :, :1], k[:, :, :1], 0)
    with pytest.raises(ValueError, match="cannot rewind"):
        cache.rewind(301)


def test_a_fork_copies_a_prefix_into_whole_growth_chunks_and_nothing_else():
    source = SpanKVCache(num_layers=2, max_length=1000)
    k, v = torch.randn(1, 2, 300, 4), torch.randn(1, 2, 300, 4)
    for layer in range(2):
        source.update(k, v, layer)
    source.commit(300)
    fork = SpanKVCache(num_layers=2, max_length=1000)
    assert fork.copy_prefix(source, 200) and fork.length == 200
    for layer in range(2):
        keys, values = fork._keys[layer], fork._values[layer]
        # capacity as the peer's KV budget reserves it (whole chunks of GROW), not the 200 tokens copied
        assert keys.shape[-2] == SpanKVCache.reserved_tokens(200, 1000) == 256
        assert torch.equal(keys[:, :, :200], k[:, :, :200]) and torch.equal(values[:, :, :200], v[:, :, :200])
        assert fork.native[layer] is not None or source.native[layer] is None  # its own buffers' native record
    keys, _ = fork.update(k[:, :, :1], v[:, :, :1], 0)
    assert keys.shape[-2] == 201 and keys.data_ptr() != source._keys[0].data_ptr()  # its own buffers
    assert not fork.copy_prefix(source, 10)  # only into an empty cache
    assert not SpanKVCache(num_layers=2, max_length=1000).copy_prefix(source, 301)  # never more than it holds
    assert not SpanKVCache(num_layers=2, max_length=100).copy_prefix(source, 101)  # nor past its own max_length
    assert not SpanKVCache(num_layers=3, max_length=1000).copy_prefix(source, 10)  # nor another span's


def test_causal_mask_lets_each_new_token_see_the_past_and_itself():
    assert causal_mask(1, 5, torch.float32, torch.device("cpu")) is None
    assert causal_mask(4, 0, torch.float32, torch.device("cpu")) is None
    mask = causal_mask(2, 3, torch.float32, torch.device("cpu"))[0, 0]
    assert (mask == 0).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


class _OldStyleLayer(torch.nn.Module):
    """A decoder layer as transformers < 5.2x writes it: the KV cache comes as `past_key_values`."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        return self.inner(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                          cache=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings)


def test_span_passes_the_cache_by_the_keyword_the_layer_takes(tiny_model_dir):
    # transformers 5.17 layers take `past_key_values`; passed as `cache=` it vanished into **kwargs and every decode
    # step attended to itself alone (found on a GPU machine with 5.17: prefill right, decode wrong).
    from swarm.model.span import BlockSpan, cache_keyword

    source = ModelSource("tiny", tiny_model_dir("llama"))
    span = load_span(source, 0, 6)
    old = BlockSpan([_OldStyleLayer(b) for b in span.blocks], span.rotary, 0, 6, span.hidden_size)
    assert (span.cache_keyword, old.cache_keyword) == ("cache", "past_key_values")
    g = torch.Generator().manual_seed(2)
    prompt, step = torch.randn(1, 5, 64, generator=g), torch.randn(1, 1, 64, generator=g)
    caches = [span.new_cache(16), old.new_cache(16)]
    for s, c in zip((span, old), caches, strict=True):
        s(prompt, c, 0)
    torch.testing.assert_close(old(step, caches[1], 5), span(step, caches[0], 5), atol=1e-6, rtol=0)
    with pytest.raises(UnsupportedModelError, match="takes no KV cache"):
        cache_keyword(_Bare())


class _Bare(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None):
        return hidden_states


@pytest.mark.parametrize("lengths", [(3, 9, 6), (7, 7, 7)])  # padded; all one length (no padding)
@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text", "mixtral", "falcon"])
def test_batched_decode_of_sessions_of_different_lengths_equals_each_alone(tiny_model_dir, family, lengths):
    # gemma2's and gemma3's sliding window (4) is shorter than every session here: each row needs its own window
    # (gemma2, eager: in the padded batch's mask; gemma3, SDPA: its row's last 4 keys)
    source = ModelSource(family, tiny_model_dir(family))
    span = load_span(source, 0, 6)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randn(1, n, 64, generator=g) for n in lengths]
    alone, batched = [span.new_cache(32) for _ in prompts], [span.new_cache(32) for _ in prompts]
    for p, a, b in zip(prompts, alone, batched, strict=True):
        span(p, a, 0)
        span(p, b, 0)
    positions = [p.shape[1] for p in prompts]
    for _ in range(3):
        step = torch.randn(len(prompts), 1, 64, generator=g)
        expected = torch.cat([span(step[i : i + 1], alone[i], positions[i]) for i in range(len(prompts))])
        got = span.forward_batch(step, batched, positions)
        if family == "llama":  # each row through the linears alone or batched (oneDNN's packed weights: the same
            # bits) and its attention over its own keys, as alone: the same bits whoever it is batched with
            assert torch.equal(got, expected), (got - expected).abs().max()
        else:  # within rounding: falcon and gemma2 (eager attention) pad the batch under a mask; gemma3's row
            # attends to its window's keys where alone masks the others; mixtral's experts compute their rows together
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        positions = [p + 1 for p in positions]
    assert [c.length for c in batched] == positions


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_steps_of_several_sessions_in_one_sequence_equal_each_alone(tiny_model_dir, family):
    """forward_mixed: decode rows of sessions of different lengths, a fresh prompt and a prompt continuing a cached
    prefix (after a rewind), in one forward; every session's output and cache equal its step run alone."""
    span = load_span(ModelSource(family, tiny_model_dir(family)), 0, 6)
    if not span.mixes:  # falcon's attention took its implementation from the config's name only from transformers 5.25
        assert family == "falcon"
        return
    g = torch.Generator().manual_seed(11)
    hidden = span.hidden_size
    history = [torch.randn(1, n, hidden, generator=g) for n in (7, 3, 0, 6)]
    alone, mixed = [span.new_cache(32) for _ in history], [span.new_cache(32) for _ in history]
    for h, a, m in zip(history, alone, mixed, strict=True):
        if h.shape[1]:
            span(h, a, 0)
            span(h, m, 0)
    # decode rows at 7 and 3, a fresh 5-token prompt, and 4 tokens at 4 (rewinding the 6 cached ones)
    plan = [(0, 1, 7), (1, 1, 3), (2, 5, 0), (3, 4, 4)]
    for _ in range(2):
        inputs = [torch.randn(1, tokens, hidden, generator=g) for _, tokens, _ in plan]
        expected = [span(x, alone[i], position) for (i, _, position), x in zip(plan, inputs, strict=True)]
        steps = [segments.Segment(mixed[i], position, tokens) for i, tokens, position in plan]
        got = span.forward_mixed(torch.cat(inputs, dim=1), steps).split([t for _, t, _ in plan], dim=1)
        for want, have in zip(expected, got, strict=True):
            torch.testing.assert_close(have, want, atol=1e-5, rtol=0)
        assert [c.length for c in mixed] == [c.length for c in alone]
        plan = [(i, 1, alone[i].length) for i, _, _ in plan]  # then every session decodes, in one forward


@pytest.mark.parametrize(("family", "direct"), [("llama", True), ("gemma2", False)])
def test_decode_rows_call_torch_sdpa_directly_only_for_plain_sdpa_attention(tiny_model_dir, monkeypatch, family,
                                                                           direct):
    # llama: transformers' SDPA with its usual arguments, so each row calls torch's function itself; gemma2 (eager,
    # soft-capping): its own attention function, once for the padded rows
    span = load_span(ModelSource(family, tiny_model_dir(family)), 0, 2)
    chosen = []
    real = segments._direct_sdpa
    monkeypatch.setattr(segments, "_direct_sdpa", lambda *a: chosen.append(real(*a) is not None) or real(*a))
    caches = [span.new_cache(32) for _ in range(3)]
    for i, cache in enumerate(caches):
        span(torch.randn(1, 4 + i, span.hidden_size), cache, 0)
    span.forward_batch(torch.randn(3, 1, span.hidden_size), caches, [c.length for c in caches], lean=False)
    assert chosen and set(chosen) == {direct}


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2"])
def test_decode_rows_native_attention_equals_torchs(tiny_model_dir, monkeypatch, family):
    # float32 on the CPU, decode rows append their keys and attend in one native call per layer (attention.py);
    # without the kernel (no C compiler) torch does both per row: the same result within float32 rounding
    if not attention.available():
        pytest.skip("no C compiler: the native kernels are unavailable")
    span = load_span(ModelSource(family, tiny_model_dir(family)), 0, 4)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randn(1, n, span.hidden_size, generator=g) for n in (9, 2, 6)]
    steps = [torch.randn(len(prompts), 1, span.hidden_size, generator=g) for _ in range(3)]
    span.prepare_lean()  # (load_span did: its check's own native calls are not counted here)
    calls = []
    real = attention.DecodeRows.attend
    monkeypatch.setattr(attention.DecodeRows, "attend", lambda *a: calls.append(1) or real(*a))
    results = []
    for native in (True, False):
        if not native:
            monkeypatch.setattr(attention, "available", lambda: False)
            monkeypatch.setattr(attention.DecodeRows, "attend", lambda *a: False)
        caches = [span.new_cache(32) for _ in prompts]
        for p, c in zip(prompts, caches, strict=True):
            span(p, c, 0)
        if native:
            assert len(calls) == 3 * 4  # the prompts' tokens too, as rows (swarm.model.lean)
            calls.clear()
        results.append(torch.cat([span.forward_batch(step, caches, [c.length for c in caches]) for step in steps]))
    assert len(calls) == 3 * 4  # every layer of every step took the native path
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
