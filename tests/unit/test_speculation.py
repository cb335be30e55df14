"""Speculative decoding's parts (`swarm.client.speculation`, `swarm_kernels.sampling.sample_with_draft`): drafts by
prompt lookup, and the choice given a draft, which must be distributed exactly as plain sampling (greedy: the same
token). The whole, token-identical to transformers through real peers: tests/e2e/test_smollm.py."""

from __future__ import annotations

import pytest
import torch

from swarm.client.speculation import PromptLookup
from swarm_kernels.sampling import Sampler, SamplingParams, probabilities, sample_with_draft


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


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.8)])
def test_a_draft_sampled_from_a_drafters_distribution_changes_nothing_of_it_and_is_kept_more(params):
    """Drafts sampled from q (a drafter model's distribution): the choice is distributed as p, and a draft is kept
    1 - TV(p, q) of the time (vs p(d) for a deterministic draft)."""
    logits = torch.tensor([[2.0, 1.5, 0.3, -1.0, 0.9, 1.2]])
    expected = probabilities(logits, params)[0]
    q = torch.tensor([0.4, 0.3, 0.05, 0.05, 0.1, 0.1])
    rows = 200_000
    generator = torch.Generator().manual_seed(11)
    draft = torch.multinomial(q, rows, replacement=True, generator=generator)
    chosen = sample_with_draft(logits.expand(rows, -1), params, draft, generator, q.expand(rows, -1))
    observed = torch.bincount(chosen, minlength=6).float() / rows
    assert torch.allclose(observed, expected, atol=0.005), (observed, expected)
    kept = float((chosen == draft).float().mean())
    overlap = float(torch.minimum(expected, q).sum())
    assert abs(kept - overlap) < 0.01, (kept, overlap)
    deterministic = sample_with_draft(logits.expand(rows, -1), params, draft, generator)
    assert kept > float((deterministic == draft).float().mean()) + 0.05


def test_greedy_keeps_a_draft_exactly_when_it_is_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample_with_draft(logits, SamplingParams(), torch.tensor([1, 2])).tolist() == [1, 0]


def test_a_sampler_given_a_draft_still_applies_its_penalties_and_bias():
    sampler = Sampler(1, 4, SamplingParams(temperature=0.0))
    from swarm_kernels.sampling import LogitsAdjustments
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


V = 8  # a fake model whose next token is always (token + 1) % V: a text that cycles, so prompt lookup drafts well


class CyclingHead:
    def embed(self, input_ids: torch.Tensor, position: int = 0) -> torch.Tensor:
        return input_ids.float()[..., None]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot((hidden[..., 0].long() + 1) % V, V).float()


class StepLog:
    """What DecodePipeline uses of a one-row session without decode groups: position, step, rewind."""

    batch_size = 1

    def __init__(self):
        self.position, self.sizes = 0, []

    async def step(self, hidden: torch.Tensor, position: int | None = None) -> torch.Tensor:
        self.position = (self.position if position is None else position) + hidden.shape[1]
        self.sizes.append(hidden.shape[1])
        return hidden

    def rewind(self, position: int) -> None:
        self.position = position


async def _generate(drafting, tokens: int = 24) -> tuple[list[int], list[int]]:
    from swarm.client.pipeline import DecodePipeline

    pipeline = DecodePipeline(CyclingHead(), decode_groups=0)
    session, prompt = StepLog(), list(range(V)) * 2 + [0, 1]
    try:
        out = [int(step.token_ids[0]) async for step in pipeline.generate(
            session, torch.tensor([prompt]), Sampler(1, V, SamplingParams(temperature=0.0)), tokens,
            drafter=PromptLookup(prompt), drafting=drafting)]
    finally:
        pipeline.close()
    return out, session.sizes[1:]  # the steps after the prompt's


async def test_drafting_is_asked_before_each_step_and_a_step_without_a_draft_is_a_plain_one():
    """The gateway's auto mode asks before each step whether to draft (few generations running): not now → plain
    one-token steps, the same tokens; allowed again → drafts again."""
    expected = [(2 + i) % V for i in range(24)]
    always, steps = await _generate(None)
    assert always == expected and max(steps) > 1 and len(steps) < 23  # drafts kept: fewer steps than tokens
    never, steps = await _generate(lambda: False)
    assert never == expected and steps == [1] * 23
    calls = []  # asked before the prompt's step too (whether a drafter should read the prompt meanwhile)
    later, steps = await _generate(lambda: calls.append(1) or len(calls) > 11)
    assert later == expected and steps[:10] == [1] * 10 and steps[10] > 1


async def test_each_kept_draft_says_how_many_of_its_steps_drafts_come_after_it():
    """A completion that ends at a kept draft (a stop string) leaves its step's later drafts out: the gateway counts
    them rejected from `unused_drafts`, so kept + unused + 1 is the step's draft count at every kept position."""
    from swarm.client.pipeline import DecodePipeline

    pipeline = DecodePipeline(CyclingHead(), decode_groups=0)
    session, prompt = StepLog(), list(range(V)) * 2 + [0, 1]
    try:
        outs = [step async for step in pipeline.generate(
            session, torch.tensor([prompt]), Sampler(1, V, SamplingParams(temperature=0.0)), 24,
            drafter=PromptLookup(prompt))]
    finally:
        pipeline.close()
    at = 1  # the prompt's step gave the first token
    for size in session.sizes[1:]:  # every step after the prompt's: its input token and size - 1 drafts
        step, at = outs[at: at + size], at + size
        assert [o.kept_draft for o in step] == [True] * (size - 1) + [False]  # the cycle: every draft is right
        assert [o.unused_drafts for o in step] == [size - 2 - i for i in range(size - 1)] + [0]
        assert step[-1].rejected_drafts == 0
    assert at == len(outs) == 24 and max(session.sizes[1:]) > 2


def test_auto_speculation_drafts_only_while_few_other_generations_run():
    """GATEWAY_SPECULATIVE=auto: a one-choice request gets a drafter whatever the load at its admission, and drafts
    at a step only while fewer than GATEWAY_SPECULATIVE_BELOW other generations hold a slot, so a burst's first
    requests join the batched rounds of the rest; `on` and a prediction draft at every step; n > 1, `off` and
    seeded sampling in auto never."""
    from types import SimpleNamespace

    from app.serving import ServingEngine
    from app.settings import GatewaySettings

    def engine(mode: str) -> ServingEngine:
        return ServingEngine(SimpleNamespace(context_length=2048),
                             GatewaySettings(gateway_speculative=mode, gateway_speculative_below=3))

    auto = engine("auto")
    speculative, drafting = auto.speculate(1)
    assert speculative and drafting is not None
    for running, allowed in [(1, True), (3, True), (4, False), (16, False), (2, True)]:  # itself among `running`
        auto.admission = SimpleNamespace(active=running)
        assert drafting() is allowed
    assert auto.speculate(1, prediction=True) == (True, None)
    assert auto.speculate(2) == (False, None) and auto.speculate(1, seeded=True) == (False, None)
    assert engine("on").speculate(1) == (True, None) and engine("on").speculate(1, seeded=True) == (True, None)
    assert engine("off").speculate(1, prediction=True) == (False, None)


async def test_a_sampling_drafters_distributions_reach_the_sampler_position_by_position():
    """The pipeline asks the drafter to prepare before the prompt's step, and hands each draft token's q row
    (Drafter.probabilities) to the sampler with that token."""
    from swarm.client.pipeline import DecodePipeline

    class Drafter:  # proposes the next two tokens of the cycle once, with made-up distributions
        def __init__(self):
            self.q, self.proposed = torch.softmax(torch.arange(2 * V, dtype=torch.float).reshape(2, V), -1), False

        async def propose(self, limit):
            if self.proposed:
                return []
            self.proposed = True
            return [2, 3]  # after the first token, 1

        def probabilities(self):
            return self.q

        def result(self, drafted, kept):
            self.kept = kept

        def extend(self, tokens):
            pass

        def prepare(self):
            self.prepared_at = list(session.sizes)  # before the prompt's step: nothing sent yet

        def close(self):
            pass

    class Recording(Sampler):
        def __call__(self, logits, draft=None, draft_probs=None):
            seen.append((None if draft is None else int(draft[0]), draft_probs))
            return super().__call__(logits, draft, draft_probs)

    seen: list = []
    drafter, session = Drafter(), StepLog()
    pipeline = DecodePipeline(CyclingHead(), decode_groups=0)
    try:
        outs = [int(step.token_ids[0]) async for step in pipeline.generate(
            session, torch.tensor([[7, 0]]), Recording(1, V, SamplingParams(temperature=0.01)), 5, drafter=drafter)]
        short = Drafter()  # 2 tokens leave no position to draft at: the drafter is not asked to read the prompt
        assert len([s async for s in pipeline.generate(StepLog(), torch.tensor([[7, 0]]), Sampler(1, V), 2,
                                                        drafter=short)]) == 2
    finally:
        pipeline.close()
    assert drafter.prepared_at == [] and not hasattr(short, "prepared_at")
    assert outs == [1, 2, 3, 4, 5] and drafter.kept == 2  # one-hot logits at T = 0.01: p(next) ≈ 1, drafts kept
    drafted = [(d, q) for d, q in seen if d is not None]
    assert [d for d, _ in drafted] == [2, 3]
    assert torch.equal(drafted[0][1], drafter.q[0:1]) and torch.equal(drafted[1][1], drafter.q[1:2])
