"""Next-token sampling in plain torch: greedy, temperature, min-p, top-k, top-p, reproducible with a seed.

    tokens = sample(logits, SamplingParams(temperature=0.7, top_p=0.9), generator)   # logits: [B, V] → [B]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

MIN_TEMPERATURE = 1e-5
MIN_TOP_P = 1e-5
MIN_LOGPROB = -9999.0  # what OpenAI reports for a token that cannot be chosen (JSON has no -inf)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → no top-k cut
    seed: int | None = None
    min_p: float = 0.0  # tokens less likely than min_p × the most likely one's probability are cut (0 → none)

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")

    @property
    def greedy(self) -> bool:
        """Greedy also below MIN_TEMPERATURE / MIN_TOP_P: their limit, where dividing by the temperature would
        overflow float32 (1e-300 made every probability NaN) and top_p keeps the top token alone anyway."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1 or self.top_p < MIN_TOP_P

    def generator(self) -> torch.Generator:
        generator = torch.Generator()
        generator.manual_seed(self.seed if self.seed is not None else torch.seed())
        return generator


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: [B, V] float → token ids [B] (int64)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, params), num_samples=1, generator=generator).squeeze(-1)


def sample_with_draft(logits: torch.Tensor, params: SamplingParams, draft: torch.Tensor,
                      generator: torch.Generator | None = None,
                      draft_probs: torch.Tensor | None = None) -> torch.Tensor:
    """Speculative sampling: logits [B, V], draft [B] → token ids [B], distributed exactly as `sample`'s. Greedy: the
    argmax, as `sample` (the draft is kept exactly when it is the argmax).

    A deterministic draft (prompt lookup, a greedy drafter): each row keeps its draft token d with probability p(d),
    else draws from p without d (renormalised): P(d) = p(d), and P(x) = (1 - p(d)) · p(x) / (1 - p(d)) = p(x) for
    every other x. A draft d sampled from q (`draft_probs` [B, V], the drafter's distribution): kept with probability
    min(1, p(d) / q(d)), else drawn from max(0, p - q) renormalised (the standard rule: P(x) = p(x) again), which
    keeps it 1 - TV(p, q) of the time instead of p(d)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, params)
    rows = torch.arange(len(draft))
    kept = probs[rows, draft]  # [B]
    if draft_probs is not None:
        q = draft_probs.to(probs.dtype)
        kept = (kept / q[rows, draft].clamp_min(1e-30)).clamp(max=1.0)
        rest = (probs - q).clamp_min(0.0)
    else:
        rest = probs.clone()
        rest[rows, draft] = 0.0
    accept = torch.rand(len(draft), generator=generator) < kept
    empty = rest.sum(dim=-1) <= 0  # p(d) = 1, or p = q: the draft is always kept
    rest[empty, 0] = 1.0
    drawn = torch.multinomial(rest, num_samples=1, generator=generator).squeeze(-1)
    return torch.where(accept | empty, draft, drawn)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `sample` draws from (not greedy): temperature, then the min-p, top-k and top-p cuts (vLLM's
    order) → probs [B, V]."""
    logits = logits.float() / params.temperature
    if params.min_p > 0:
        probs = logits.softmax(dim=-1)
        floor = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))  # the most likely token always stays
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


@dataclass(frozen=True)
class LogitsAdjustments:
    """OpenAI-style adjustments applied to raw logits before sampling."""

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    repetition_penalty: float = 1.0  # vLLM's and transformers' (CTRL's): on the prompt's tokens and those chosen

    @property
    def active(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)


def adjust_logits(logits: torch.Tensor, counts: torch.Tensor | None, adjust: LogitsAdjustments,
                  seen: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V]; counts: [B, V] times each token was generated so far in that row (None: no penalty); seen:
    [B, V] bool, the tokens of the row's prompt and of what it generated (None: no repetition penalty) → an adjusted
    copy in float32.

    A seen token's logit is divided by repetition_penalty where positive, multiplied by it where not; then
    logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0); logit[t] += bias[t]. A term whose
    parameter is 0 (1 for the repetition penalty) is not computed (each is a pass over the vocabulary: with a
    logit_bias alone, a row of SmolLM2's 49,152 logits took 75 us, now 13 us).
    """
    adjusted = logits.float()
    if seen is not None and adjust.repetition_penalty != 1.0:
        penalty = adjust.repetition_penalty
        adjusted = adjusted.clone() if adjusted is logits else adjusted
        rows, ids = seen.nonzero(as_tuple=True)  # a few thousand of the vocabulary at most: only those are touched
        values = adjusted[rows, ids]
        adjusted[rows, ids] = torch.where(values > 0, values / penalty, values * penalty)
    if counts is not None and adjust.frequency_penalty:
        adjusted = adjusted - adjust.frequency_penalty * counts
    if counts is not None and adjust.presence_penalty:
        adjusted = adjusted - adjust.presence_penalty * (counts > 0).float()
    if adjusted is logits:
        adjusted = adjusted.clone()
    if adjust.logit_bias:
        ids = torch.tensor([token for token, _ in adjust.logit_bias])
        bias = torch.tensor([value for _, value in adjust.logit_bias], dtype=adjusted.dtype)
        adjusted[:, ids] += bias
    return adjusted


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens [B] and the k most likely tokens ([B, k] ids, [B, k] logprobs)."""
    logprobs = logits.float().log_softmax(dim=-1).clamp(min=MIN_LOGPROB)  # a masked token: -9999, as OpenAI
    values, ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], chosen[:, None][:, :0])
    return logprobs.gather(-1, chosen[:, None]).squeeze(-1), ids, values


@dataclass(frozen=True)
class Choice:
    """What a Sampler chose at one position, per row."""

    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B]: of the chosen tokens (when asked)
    top_ids: torch.Tensor | None = None  # [B, k]
    top_logprobs: torch.Tensor | None = None  # [B, k]


class Constraint(Protocol):
    """Which tokens each row may take next (e.g. a grammar: swarm.client.grammar.Constraint)."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor: ...
    def advance(self, chosen: torch.Tensor) -> None: ...


class Sampler:
    """One request's sampling: adjustments (penalties over the tokens chosen so far, logit bias), a constraint (the
    tokens it does not allow are never chosen, whatever the other parameters), the choice (greedy or seeded
    sampling), and log-probabilities when asked (`logprobs`: how many top alternatives; None: none), of the
    distribution sampled from.

        sampler = Sampler(rows=2, vocab_size=V, params=SamplingParams(temperature=0.7, seed=1), logprobs=3)
        choice = sampler(logits)   # logits [2, V] → Choice; call once per position, in order
    """

    def __init__(self, rows: int, vocab_size: int, params: SamplingParams = SamplingParams(),
                 adjust: LogitsAdjustments = LogitsAdjustments(), logprobs: int | None = None,
                 constraint: Constraint | None = None, prompt: Sequence[int] = ()):
        self.params, self.adjust, self.logprobs, self.constraint = params, adjust, logprobs, constraint
        self.generator = params.generator()
        penalised = adjust.presence_penalty or adjust.frequency_penalty
        self.counts = torch.zeros(rows, vocab_size) if penalised else None  # what the penalties count
        self.seen = None  # what the repetition penalty penalises: the prompt's tokens (`prompt`), then the chosen
        if adjust.repetition_penalty != 1.0:
            self.seen = torch.zeros(rows, vocab_size, dtype=torch.bool)
            self.seen[:, torch.tensor([t for t in prompt if 0 <= t < vocab_size], dtype=torch.long)] = True

    def __call__(self, logits: torch.Tensor, draft: torch.Tensor | None = None,
                 draft_probs: torch.Tensor | None = None) -> Choice:
        """The next position's choice; with `draft` [B] (a drafter's guess of it, sampled from `draft_probs` [B, V]
        where given), by speculative sampling: the same distribution, and the draft kept as often as that allows
        (`sample_with_draft`)."""
        if self.adjust.active:
            logits = adjust_logits(logits, self.counts, self.adjust, self.seen)
        if self.constraint is not None:
            logits = self.constraint.apply(logits)
        chosen = (sample(logits, self.params, self.generator) if draft is None
                  else sample_with_draft(logits, self.params, draft, self.generator, draft_probs))
        if self.constraint is not None:
            self.constraint.advance(chosen)
        if self.counts is not None:
            self.counts[torch.arange(len(chosen)), chosen] += 1
        if self.seen is not None:
            self.seen[torch.arange(len(chosen)), chosen] = True
        if self.logprobs is None:
            return Choice(chosen)
        return Choice(chosen, *top_logprobs(logits, chosen, self.logprobs))

    @property
    def plain_greedy(self) -> bool:
        """Whether its choice is the argmax after the logit bias alone (greedy; no penalty, constraint or
        log-probabilities), with nothing to remember: what `choose_greedy` computes for many rows at once."""
        return (self.params.greedy and self.constraint is None and self.logprobs is None and self.counts is None
                and self.seen is None)


@functools.lru_cache(maxsize=256)
def _bias_tensors(bias: tuple[tuple[int, float], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A logit bias's token ids and float32 values (read only), made once per distinct bias."""
    return torch.tensor([token for token, _ in bias]), torch.tensor([value for _, value in bias], dtype=torch.float32)


def choose_greedy(logits: torch.Tensor, biases: Sequence[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """logits: float32 [B, V], one row per request; biases: each row's logit bias → the token ids [B] that a plain
    greedy `Sampler` (`plain_greedy`) with that bias chooses from each row alone, in one pass over the rows.

    Each row's bias is added to the logits in place, as `adjust_logits` adds it to its copy (the same float32 sums),
    and undone after (the biased entries' old values written back), so `logits` is as it was when this returns or
    raises; the writes are made in inference mode, where the head's logits were made (an inference tensor refuses
    in-place writes outside it). The choice is `max`'s index, the first of the largest as argmax's (NaN counting as
    the largest; the same on ties, NaN, infinite and all -inf rows, tests/unit/test_sampling.py) at a third of its
    time: 16 rows of SmolLM2's 49,152 logits 1.04 → 0.36 ms; through each row's Sampler they took ~1.7 ms."""
    if logits.dtype != torch.float32:
        raise TypeError(f"float32 logits expected, not {logits.dtype}")
    rows: dict[tuple[tuple[int, float], ...], list[int]] = {}  # the rows of each distinct bias: one index op each
    for k, bias in enumerate(biases):
        if bias:
            rows.setdefault(bias, []).append(k)
    saved: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = []
    try:
        with torch.inference_mode():
            for bias, ks in rows.items():
                ids, values = _bias_tensors(bias)
                where = (torch.tensor(ks)[:, None], ids[None, :])
                saved.append((where, logits[where]))
                logits[where] += values
        return logits.max(dim=-1).indices  # outside inference mode: an ordinary tensor for the callers
    finally:
        with torch.inference_mode():
            for where, old in reversed(saved):
                logits[where] = old
