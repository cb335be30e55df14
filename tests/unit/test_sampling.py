"""Sampling: greedy is argmax, seeds reproduce, top-k / top-p keep only the tokens they should."""

from __future__ import annotations

import pytest
import torch

from swarm_kernels.sampling import (
    LogitsAdjustments,
    Sampler,
    SamplingParams,
    adjust_logits,
    choose_greedy,
    probabilities,
    sample,
    top_logprobs,
)


def logits_batch():
    return torch.randn(4, 100, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax():
    logits = logits_batch()
    assert torch.equal(sample(logits, SamplingParams()), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(temperature=1.0, top_k=1)), logits.argmax(-1))


def test_same_seed_same_tokens_and_other_seed_differs():
    logits = logits_batch()
    params = SamplingParams(temperature=1.0, seed=42)
    draws = [torch.stack([sample(logits, params, g) for _ in range(20)]) for g in (params.generator(),
                                                                                   params.generator())]
    assert torch.equal(draws[0], draws[1])
    other = SamplingParams(temperature=1.0, seed=43).generator()
    assert not torch.equal(draws[0], torch.stack([sample(logits, params, other) for _ in range(20)]))


def test_top_k_only_draws_from_the_k_best():
    logits = logits_batch()
    params = SamplingParams(temperature=5.0, top_k=3, seed=0)
    generator = params.generator()
    allowed = logits.topk(3, dim=-1).indices
    for _ in range(50):
        tokens = sample(logits, params, generator)
        assert (allowed == tokens[:, None]).any(-1).all()


def test_top_p_keeps_the_smallest_set_holding_p_of_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.75, seed=0)
    generator = params.generator()
    seen = {int(sample(logits, params, generator)) for _ in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 >= 0.75: token 2 and 3 are cut


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2}])
def test_invalid_params_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_penalties_and_bias_follow_the_openai_formula():
    logits = torch.zeros(2, 5)
    counts = torch.tensor([[0, 1, 3, 0, 0], [2, 0, 0, 0, 0]], dtype=torch.float32)
    adjust = LogitsAdjustments(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((4, 10.0),))
    out = adjust_logits(logits, counts, adjust)
    assert out.tolist() == [[0, -0.75, -1.25, 0, 10], [-1.0, 0, 0, 0, 10]]
    assert torch.equal(logits, torch.zeros(2, 5)), "the input must not be modified"


def test_each_adjustment_alone_and_a_bias_without_counts():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    counts = torch.tensor([[0.0, 2.0, 0.0]])
    assert adjust_logits(logits, counts, LogitsAdjustments(frequency_penalty=1.0)).tolist() == [[1.0, 0.0, 3.0]]
    assert adjust_logits(logits, counts, LogitsAdjustments(presence_penalty=1.0)).tolist() == [[1.0, 1.0, 3.0]]
    biased = adjust_logits(logits, None, LogitsAdjustments(logit_bias=((0, -100.0),)))
    assert biased.tolist() == [[-99.0, 2.0, 3.0]] and logits.tolist() == [[1.0, 2.0, 3.0]]  # a copy


def test_top_logprobs_are_sorted_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    chosen_lp, ids, values = top_logprobs(logits, torch.tensor([2]), 2)
    expected = logits.log_softmax(-1)
    assert ids.tolist() == [[1, 2]] and torch.allclose(values, expected[:, [1, 2]])
    assert torch.allclose(chosen_lp, expected[:, 2])


@pytest.mark.parametrize(("temperature", "top_p"), [(1e-300, 1.0), (1e-6, 1.0), (1.0, 1e-300), (5e-324, 1e-12)])
def test_vanishing_temperature_or_top_p_is_greedy_not_nan(temperature, top_p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(4)) * 10
    chosen = sample(logits, SamplingParams(temperature=temperature, top_p=top_p, seed=1))
    assert torch.equal(chosen, logits.argmax(-1))


def test_repetition_penalty_min_p_and_top_k_equal_transformers_processors():
    """vLLM's extra parameters against transformers' own logits processors: the repetition penalty on the prompt's
    tokens and the chosen ones, and the min-p / top-k cuts of the distribution sampled from."""
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

    torch.manual_seed(0)
    vocab, prompt = 50, [3, 7, 7, 11]
    logits = torch.randn(2, vocab) * 3
    sampler = Sampler(2, vocab, SamplingParams(temperature=0.0), LogitsAdjustments(repetition_penalty=1.3),
                      prompt=prompt)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt] * 2), logits.clone())
    assert torch.equal(adjust_logits(logits, None, sampler.adjust, sampler.seen), expected)  # the prompt's tokens
    assert not torch.equal(expected, logits)
    first = sampler(logits.clone())  # greedy under the penalty
    assert torch.equal(first.token_ids, expected.argmax(-1))
    seen = torch.tensor([[*prompt, int(t)] for t in first.token_ids])  # then the prompt's and the chosen ones
    assert torch.equal(adjust_logits(logits, None, sampler.adjust, sampler.seen),
                       RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone()))
    scaled = logits / 0.7
    for params, warper in [(SamplingParams(0.7, min_p=0.2), MinPLogitsWarper(0.2)),
                           (SamplingParams(0.7, top_k=5), TopKLogitsWarper(5))]:
        ours = probabilities(logits, params)
        theirs = warper(None, scaled.clone()).softmax(-1)
        assert torch.equal(ours > 0, theirs > 0) and torch.allclose(ours, theirs, atol=1e-6)


def test_extra_sampling_parameters_reach_the_sampler_and_out_of_range_ones_are_400s():
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.settings import GatewaySettings
    from tests.unit.test_gateway import FakeBackend

    backend = FakeBackend()
    body = {"model": "fake/model-1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(create_app(GatewaySettings(), backend=backend)) as client:
        assert client.post("/v1/chat/completions", json={**body, "top_k": 40, "min_p": 0.05,
                                                         "repetition_penalty": 1.1}).status_code == 200
        assert client.post("/v1/completions", json={"model": "fake/model-1", "prompt": "hi", "top_k": 1,
                                                    "repetition_penalty": 1.2}).status_code == 200
        refused = [(name, client.post("/v1/chat/completions", json={**body, name: value}))
                   for name, value in [("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0),
                                       ("repetition_penalty", 1e-39), ("repetition_penalty", 2.5), ("min_p", "x")]]
    chat, legacy = backend.requests
    assert (chat.top_k, chat.min_p, chat.repetition_penalty, chat.temperature) == (40, 0.05, 1.1, 1.0)
    assert (legacy.top_k, legacy.temperature, legacy.repetition_penalty) == (0, 0.0, 1.2)  # top_k 1: greedy
    for name, response in refused:
        assert response.status_code == 400 and response.json()["error"]["param"] == name, response.text


def test_choose_greedy_picks_what_each_rows_own_greedy_sampler_picks_and_leaves_the_logits_as_they_were():
    with torch.inference_mode():  # as the head's logits: an inference tensor (no in-place writes outside the mode)
        logits = torch.randn(9, 300, generator=torch.Generator().manual_seed(5))
        logits[5, 7] = logits[5, 9] = logits[5].max() + 1  # a tie: the first index, as the sampler's argmax
        logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # the tie broken by the bias on 7, given twice
        logits[4, 11] = float("nan")  # a NaN row: argmax's choice either way
        logits[6, 20] = logits[6, 30] = float("inf")  # two infinities: the first
        logits[7] = float("-inf")  # nothing above -inf: the first
        logits[8, 40] = float("inf")
        logits[8, 10] = float("nan")  # NaN before an infinity: the NaN
    biases = [((3, 100.0),), (), ((7, -5.0), (7, -5.0), (8, 0.5)), ((299, 2.5), (0, -1e9)), ((1, 3.0),), (), (),
              ((5, 1.0),), ()]
    before = logits.clone()
    chosen = choose_greedy(logits, biases)
    assert torch.equal(logits.view(torch.int32), before.view(torch.int32))  # bit for bit, the NaN too
    for k, bias in enumerate(biases):
        sampler = Sampler(1, 300, adjust=LogitsAdjustments(logit_bias=bias))
        assert sampler.plain_greedy
        assert torch.equal(chosen[k:k + 1], sampler(logits[k:k + 1]).token_ids), k
    assert chosen.tolist() == [3, int(logits[1].argmax()), 9, int(chosen[3]), 11, 7, 20, 0, 10]
    normal = logits.clone()  # an ordinary tensor too
    assert torch.equal(choose_greedy(normal, biases), chosen)


def test_choose_greedy_undoes_its_biases_when_a_row_fails_and_refuses_other_dtypes():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(6))
    before = logits.clone()
    with pytest.raises(IndexError):
        choose_greedy(logits, [((1, 5.0),), ((2, 1.0),), ((50, 1.0),)])  # past the vocabulary
    assert torch.equal(logits, before)
    with pytest.raises(TypeError):
        choose_greedy(logits.double(), [(), (), ()])


@pytest.mark.parametrize("sampler", [
    Sampler(1, 10, SamplingParams(temperature=0.7, seed=1)),
    Sampler(1, 10, adjust=LogitsAdjustments(presence_penalty=0.5)),
    Sampler(1, 10, adjust=LogitsAdjustments(repetition_penalty=1.2)),
    Sampler(1, 10, logprobs=2),
])
def test_samplers_with_more_than_a_bias_are_not_plain_greedy(sampler):
    assert not sampler.plain_greedy
