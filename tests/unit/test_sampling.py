"""Sampling: greedy is argmax, seeds reproduce, top-k / top-p keep only the tokens they should."""

from __future__ import annotations

import pytest
import torch

from swarm_kernels.sampling import LogitsAdjustments, SamplingParams, adjust_logits, sample, top_logprobs


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
