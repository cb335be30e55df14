"""Speculative decoding's parts (`swarm.client.speculation`, `kernels.sampling.sample_with_draft`): drafts by
prompt lookup, and the choice given a draft, which must be distributed exactly as plain sampling (greedy: the same
token). The whole, token-identical to transformers through real peers: tests/e2e/test_smollm.py."""

from __future__ import annotations

import pytest
import torch

from kernels.sampling import Sampler, SamplingParams, probabilities, sample_with_draft
from swarm.client.speculation import PromptLookup


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8),
                                    SamplingParams(temperature=1.3, top_k=3)])
@pytest.mark.parametrize("draft", [0, 2, 5])
def test_a_draft_changes_nothing_of_the_distribution(params, draft):
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.9, 1.2]])
    expected = probabilities(logits, params)[0]
    rows = 200_000
    generator = torch.Generator().manual_seed(7)
    chosen = sample_with_draft(logits.expand(rows, -1), params, torch.full((rows,), draft), generator)
    observed = torch.bincount(chosen, minlength=6).float() / rows
    assert torch.allclose(observed, expected, atol=0.005), (observed, expected)


def test_greedy_keeps_a_draft_exactly_when_it_is_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample_with_draft(logits, SamplingParams(), torch.tensor([1, 2])).tolist() == [1, 0]


def test_a_sampler_given_a_draft_still_applies_its_penalties_and_bias():
    sampler = Sampler(1, 4, SamplingParams(temperature=0.0))
    from kernels.sampling import LogitsAdjustments
    biased = Sampler(1, 4, SamplingParams(temperature=0.0), LogitsAdjustments(logit_bias=((1, -100.0),)))
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    assert int(sampler(logits, torch.tensor([1])).token_ids[0]) == 1
    assert int(biased(logits, torch.tensor([1])).token_ids[0]) == 2  # the bias wins over the draft


def test_prompt_lookup_drafts_what_followed_the_longest_match():
    text = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    drafter = PromptLookup([*text, 20, 3, 4], first_draft=4, min_ngram=2)
    assert drafter.draft(10) == [5, 6, 7, 8]  # "3 4" occurred before, followed by 5 6 7 8
    assert drafter.draft(2) == [5, 6]
    drafter.extend([5])
    assert drafter.draft(10) == [6, 7, 8, 9]  # "3 4 5" now: the longer match
    assert PromptLookup([1, 2, 3, 9, 9], min_ngram=2).draft(4) == []  # "9 9" never occurred before
    assert PromptLookup([*text, 20, 3, 4]).draft(4) == []  # by default, two tokens are too few in the text itself
    assert PromptLookup([*text, 20, 2, 3, 4]).draft(4) == [5, 6]  # a first draft is 2 tokens


def test_a_prediction_is_looked_up_first():
    drafter = PromptLookup([7, 1, 2, 8, 8, 1, 2], prediction=[5, 1, 2, 3, 4, 5], first_draft=3)
    assert drafter.draft(5) == [3, 4, 5]


def test_draft_length_adapts_and_rejections_pause_drafting():
    drafter = PromptLookup(list(range(10)) * 3, first_draft=4, max_draft=8)
    assert len(drafter.draft(100)) == 4
    drafter.result(4, 4)
    assert len(drafter.draft(100)) == 6
    drafter.result(6, 2)
    assert len(drafter.draft(100)) == 3
    drafter.result(3, 0)  # nothing kept: no draft for the next position
    assert drafter.draft(100) == []
    drafter.extend([0])
    assert drafter.draft(100) != []
    drafter.result(1, 0)
    drafter.extend([1])
    assert drafter.draft(100) == []  # the pause doubled
    drafter.extend([2])
    assert drafter.draft(100) != []
    assert (drafter.drafted, drafter.kept) == (14, 6)
