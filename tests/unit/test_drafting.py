"""Drafts from a local model (`swarm.client.drafting`): the draft model's own greedy text (or samples of its
distribution), a KV cache that follows what the chain kept, the length that pays, a shared budget, failures, and a
vocabulary check. Through real peers, token-identical to
transformers: tests/e2e/test_smollm.py."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.client.drafting import DraftModel, IncompatibleDrafter, ModelDrafter, check_vocabularies
from swarm.model.head import load_head
from swarm.model.source import ModelSource
from swarm.model.span import load_span
from swarm_kernels.sampling import SamplingParams

CONTEXT = [100, 200, 300, 400]  # the tiny model's greedy text after it repeats no 3 tokens early


def text(n: int) -> list[int]:
    """n tokens in which prompt lookup finds nothing (no 3 repeated in a row)."""
    rng = random.Random(n)
    return [rng.randrange(2, 512) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    path = tiny_model_dir("llama")
    source = ModelSource("tiny-llama", path)
    model = DraftModel(load_span(source, 0, 6), load_head(source), vocab_size=512, max_length=512)
    yield model, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.close()


def drafts(drafter: ModelDrafter, limit: int) -> list[int]:
    """A warmed drafter's proposal (its first proposal only starts reading the prompt) of `limit` tokens at most,
    as where drafts pay (a far chain, a quick drafter)."""
    drafter._draft_seconds, drafter._step_seconds = 0.001, 1.0

    while drafter._model.busy:  # another drafter's job (its close) still on the thread
        time.sleep(0.001)

    async def go():
        if drafter._warm is None:
            assert await drafter.propose(limit) == []
            await drafter._warm
        return await drafter.propose(limit)
    return asyncio.run(go())


def test_a_draft_is_the_draft_models_greedy_text(tiny):
    model, reference = tiny
    drafter = ModelDrafter(model, CONTEXT, min_probability=0.0)
    x = torch.tensor([CONTEXT])
    expected = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False,
                                  eos_token_id=None)[0, len(CONTEXT):].tolist()
    assert drafts(drafter, 6) == expected


def test_after_a_partly_kept_draft_the_cache_drafts_as_a_fresh_one(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT, min_probability=0.0)
    first = drafts(drafter, 6)
    drafter.result(6, 2)
    other = (first[2] + 1) % 512  # the chain chose another token after the two it kept
    drafter.extend([*first[:2], other])
    fresh = ModelDrafter(model, [*CONTEXT, *first[:2], other], min_probability=0.0)
    assert drafts(drafter, 5) == drafts(fresh, 5)
    assert drafter._fed == [*CONTEXT, *first[:2], other, *drafts(fresh, 5)[:4]]
    drafter.close()
    fresh.close()


def test_a_draft_stops_at_a_token_the_model_doubts(tiny):
    model, _ = tiny
    sure = drafts(ModelDrafter(model, CONTEXT, min_probability=0.0), 8)
    assert drafts(ModelDrafter(model, CONTEXT, min_probability=1.0), 8) == []
    logits = model.forward(CONTEXT, model.new_cache(), 0)
    first = float(torch.softmax(logits, -1).max())
    assert drafts(ModelDrafter(model, CONTEXT, min_probability=first - 1e-4), 8)[:1] == sure[:1]


def test_a_prepared_drafter_reads_the_prompt_while_the_chain_does_and_drafts_at_the_first_step(tiny):
    model, _ = tiny
    while model.busy:
        time.sleep(0.001)
    expected = drafts(ModelDrafter(model, CONTEXT, min_probability=0.0), 4)
    drafter = ModelDrafter(model, CONTEXT[:-1], min_probability=0.0)
    drafter._draft_seconds, drafter._step_seconds = 0.001, 1.0

    async def go():
        drafter.prepare()  # before the chain's prefill: the first token is not known yet
        await drafter._warm
        assert drafter._fed == CONTEXT[:-2]
        drafter.extend(CONTEXT[-1:])  # the first token
        return await drafter.propose(4)
    assert asyncio.run(go()) == expected
    drafter.close()


def test_prompt_lookup_drafts_first_without_a_forward(tiny):
    model, _ = tiny
    text = [1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3]
    drafter = ModelDrafter(model, text)
    assert asyncio.run(drafter.propose(3)) == [4, 5]  # prompt lookup's first draft: 2 tokens
    assert drafter._warm is None and drafter._cache is None
    drafter.result(2, 2)
    assert drafter.kept == 2 and drafter.model_drafted == 0


def test_the_length_is_what_gives_the_most_tokens_a_second(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT)
    assert drafter._length(8) == ModelDrafter.FIRST_DRAFT  # nothing measured yet
    drafter._draft_seconds, drafter._step_seconds = 0.005, 0.2  # a far chain, a quick drafter
    drafter._hits, drafter._misses = 9.0, 1.0
    assert drafter._length(8) == 8 and drafter._length(3) == 3
    drafter._draft_seconds, drafter._step_seconds = 0.05, 0.02  # a near chain, a slow drafter: plain steps pay
    drafter._hits, drafter._misses = 1.0, 4.0
    lengths = [drafter._length(8) for _ in range(2 * ModelDrafter.PROBE_EVERY)]
    assert lengths.count(1) == 2 and set(lengths) == {0, 1}  # and a one-token probe now and then
    # a good drafter whose drafts and verifying steps cost more than the plain steps they save (one that shares
    # the peers' cores): the plain steps' measured time decides
    drafter._hits, drafter._misses = 9.0, 1.0
    drafter._draft_seconds, drafter._step_seconds, drafter._plain_seconds = 0.015, 0.025, 0.015
    assert drafter._length(8) in (0, 1)
    drafter._plain_seconds = 0.03
    assert drafter._length(8) >= 2  # 2 here: (1 - 0.9^3) / 0.1 tokens in 55 ms beat 1 in 30


def test_a_plain_step_after_an_empty_proposal_is_timed_up_to_its_token(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT)
    model.busy += 1  # the proposal is empty: a plain step follows
    try:
        assert asyncio.run(drafter.propose(4)) == []
    finally:
        model.busy -= 1
    time.sleep(0.02)
    drafter.extend([7])
    assert 0.02 <= drafter._plain_seconds < 1.0 and drafter._plain_since is None
    drafter.extend([8])  # no proposal before it: not a plain step's measure
    assert drafter._plain_seconds < 1.0 and drafter._plain_since is None


def test_results_move_the_acceptance(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT)
    drafter._source = "model"
    before = drafter.acceptance
    for _ in range(5):
        drafter.result(4, 0)
    assert drafter.acceptance < before / 2
    for _ in range(20):
        drafter.result(4, 4)
    assert drafter.acceptance > 0.9 and drafter.model_kept == 80


def test_a_busy_draft_model_means_a_plain_step_not_a_wait(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT, min_probability=0.0)
    model.busy += 1  # another generation's draft or prompt on the thread
    try:
        assert asyncio.run(drafter.propose(4)) == [] and drafter._warm is None
    finally:
        model.busy -= 1
    assert len(drafts(drafter, 4)) == 4 and model.busy == 0


def test_a_draft_near_the_draft_models_context_is_what_fits(tiny):
    model, _ = tiny  # a context of 512 tokens
    near = ModelDrafter(model, text(508), min_probability=0.0)
    assert len(drafts(near, 2000)) == 5 and len(near._fed) == 512  # 508 + 5 - 1: the last draft is not read
    full = ModelDrafter(model, text(512), min_probability=0.0)
    assert len(drafts(full, 2000)) == 1
    past = ModelDrafter(model, text(513))
    assert asyncio.run(past.propose(8)) == [] and past._warm is None
    for drafter in (near, full, past):
        drafter.close()


def test_a_closed_drafter_stops_reading_its_prompt_and_frees_its_budget(tiny):
    model, _ = tiny
    forwards = []
    forward = model.forward
    model.forward = lambda *args: (forwards.append(len(args[0])), forward(*args))[1]
    try:
        drafter = ModelDrafter(model, text(500))  # 2 chunks of PROMPT_CHUNK
        held = model.held  # other tests' drafters
        while model.busy:
            time.sleep(0.001)

        async def go():
            assert await drafter.propose(8) == []
            assert model.held == held + 512 and drafter._warm is not None
            drafter.close()
            await asyncio.wrap_future(model.submit(lambda: None))  # everything before it on the thread has run
        asyncio.run(go())
    finally:
        del model.forward
    assert forwards in ([], [ModelDrafter.PROMPT_CHUNK])  # not the second chunk
    assert model.held == held and drafter._cache is None and drafter._fed == []


def test_a_failing_draft_model_leaves_the_generation_to_prompt_lookup(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT, min_probability=0.0)
    drafts(drafter, 4)

    def broken(*args):
        raise RuntimeError("out of memory")
    model.forward = broken
    try:
        assert asyncio.run(drafter.propose(4)) == [] and drafter._off
        assert asyncio.run(drafter.propose(4)) == []
    finally:
        del model.forward
    drafter.close()


def test_past_the_shared_budget_a_generation_drafts_by_lookup_only(tiny):
    shared, _ = tiny
    model = DraftModel(shared.span, shared.head, vocab_size=512, max_length=512, budget_tokens=128)
    try:
        first, second = ModelDrafter(model, text(100)), ModelDrafter(model, text(101))
        drafts(first, 4)
        assert model.held == 128
        assert asyncio.run(second.propose(8)) == [] and second._off and second._warm is None
        first.close()
        assert model.held == 0
    finally:
        model.close()


def test_a_model_that_doubts_its_first_token_counts_a_step_without_a_draft(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT, min_probability=1.0)
    before = drafter.acceptance
    assert drafts(drafter, 4) == []
    assert drafter.acceptance < before and drafter._draft_seconds is not None
    drafter.close()


def test_seeded_sampling_drafts_by_prompt_lookup_only(tiny):
    from types import SimpleNamespace

    from swarm.client.speculation import PromptLookup
    from swarm.client.textgen import SwarmTextService

    model, _ = tiny
    service = SimpleNamespace(draft_model=model)
    for params, kind in ((SamplingParams(), ModelDrafter), (SamplingParams(seed=3), ModelDrafter),
                         (SamplingParams(0.7), ModelDrafter), (SamplingParams(0.7, seed=3), PromptLookup)):
        assert isinstance(SwarmTextService._drafter(service, CONTEXT, (), params), kind), params


def test_a_sampling_drafter_samples_its_drafts_and_says_from_what(tiny):
    model, _ = tiny
    drafter = ModelDrafter(model, CONTEXT, min_probability=0.0, params=SamplingParams(temperature=1.0, top_k=3))
    draft = drafts(drafter, 6)
    q = drafter.probabilities()
    assert len(draft) == 6 and q.shape == (6, 512)
    assert torch.allclose(q.sum(-1), torch.ones(6)) and ((q > 0).sum(-1) == 3).all()  # top_k applied
    assert all(q[i, d] > 0 for i, d in enumerate(draft))
    greedy = ModelDrafter(model, CONTEXT, min_probability=0.0, params=SamplingParams(temperature=0.0))
    assert drafts(greedy, 4) and greedy.probabilities() is None
    samples = {tuple(drafts(ModelDrafter(model, CONTEXT, min_probability=0.0,
                                         params=SamplingParams(temperature=1.0)), 3)) for _ in range(8)}
    assert len(samples) > 1  # sampled, not the argmax every time


def test_a_draft_model_with_fewer_head_rows_than_the_served_model_never_proposes_the_rest(tiny):
    from swarm_kernels.sampling import sample_with_draft

    shared, _ = tiny  # a head of 512 rows for a served model of 520
    model = DraftModel(shared.span, shared.head, vocab_size=520, max_length=512)
    try:
        params = SamplingParams(temperature=1.0)
        drafter = ModelDrafter(model, CONTEXT, min_probability=0.0, params=params)
        draft = drafts(drafter, 3)
        q = drafter.probabilities()
        assert q.shape == (3, 520) and float(q[:, 512:].sum()) == 0 and max(draft) < 512
        chosen = sample_with_draft(torch.randn(1, 520), params, torch.tensor(draft[:1]), None, q[:1])
        assert 0 <= int(chosen) < 520
        drafter.close()
    finally:
        model.close()


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_another_vocabulary_is_refused():
    check_vocabularies(_Vocab({"a": 0, "b": 1}), _Vocab({"b": 1, "a": 0}))
    with pytest.raises(IncompatibleDrafter, match="4 entries differ"):
        check_vocabularies(_Vocab({"a": 0, "b": 1}), _Vocab({"a": 1, "b": 0}))
    with pytest.raises(IncompatibleDrafter, match="3 vs 2 tokens"):
        check_vocabularies(_Vocab({"a": 0, "b": 1, "c": 2}), _Vocab({"a": 0, "b": 1}))


def test_a_draft_model_without_a_tokenizer_is_refused(tiny_model_dir):
    with pytest.raises(IncompatibleDrafter, match="no tokenizer"):
        DraftModel.load(str(tiny_model_dir("llama")), _Vocab({}), 512)
